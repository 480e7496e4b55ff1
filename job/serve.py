"""Export a trained workdir as a model that serves raw images, and evaluate a workdir.

Export rebuilds the model outside any distribution strategy in float32, restores the
newest checkpoint that reads back (warning about damaged ones), and writes:
  <workdir>/export/model.keras     Keras 3 file: uint8 images in, probabilities out
  <workdir>/export/saved_model/    TF SavedModel with a `serve` endpoint, for TF Serving
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from job import data as data_lib
from job.checkpoints import NoReadableCheckpoint, checkpoints_to_try, restore_newest
from job.config import Config
from job.model import build_model, serving_model

log = logging.getLogger(__name__)


class NothingToLoad(RuntimeError):
    """The workdir has neither a checkpoint nor an exported model."""


def export_dir(workdir: str) -> str:
    return os.path.join(workdir, "export")


def restore_classifier(config: Config, workdir: str, checkpoint: Optional[str] = None):
    """A float32 TransferModel holding the weights of `checkpoint` (default: the workdir's newest
    that reads back, past damaged ones, as training resumes) and that checkpoint's path."""
    directory = os.path.join(workdir, "checkpoints")
    if checkpoint is None and not checkpoints_to_try(directory):
        raise NothingToLoad(f"workdir {workdir!r}: no checkpoint in {directory}")
    num_classes = data_lib.dataset_info(config.data, []).num_classes
    keras.mixed_precision.set_global_policy("float32")
    # weights="none": the checkpoint holds every weight, no need to read ImageNet's.
    model = build_model(config.model.image_size, config.model.alpha, "none", num_classes, config.model.dropout)
    reader = tf.train.Checkpoint(model=model.classifier)
    if checkpoint is not None:
        reader.restore(checkpoint).expect_partial().assert_existing_objects_matched()
        return model, checkpoint
    return model, restore_newest(reader, directory, partial=True)


def export(config: Config, workdir: str) -> str:
    model, latest = restore_classifier(config, workdir)
    served = serving_model(model, config.model.image_size)
    out = export_dir(workdir)
    os.makedirs(out, exist_ok=True)
    served.save(exported_model_path(workdir))
    served.export(os.path.join(out, "saved_model"), format="tf_saved_model", verbose=False)
    log.info("exported %s to %s", latest, out)
    return out


def exported_model_path(workdir: str) -> str:
    return os.path.join(export_dir(workdir), "model.keras")


def load_exported(workdir: str) -> keras.Model:
    path = exported_model_path(workdir)
    if not os.path.isfile(path):
        raise NothingToLoad(f"workdir {workdir!r}: no exported model at {path}")
    return keras.models.load_model(path)


def evaluate(config: Config, workdir: str, split: str) -> dict:
    """Accuracy of the workdir's latest checkpoint (else its exported model) on `split`."""
    try:
        model, source = restore_classifier(config, workdir)
        served = serving_model(model, config.model.image_size)
    except (NothingToLoad, NoReadableCheckpoint) as err:
        if isinstance(err, NoReadableCheckpoint):
            if not os.path.isfile(exported_model_path(workdir)):
                raise
            log.warning("%s; evaluating the exported model instead", err)
        served, source = load_exported(workdir), exported_model_path(workdir)
    raw = data_lib.load_images(config.data, split).batch(256)
    correct = count = 0
    for images, labels in raw:
        predicted = np.argmax(served(images, training=False), axis=-1)
        correct += int(np.sum(predicted == labels.numpy()))
        count += int(labels.shape[0])
    return {"split": split, "accuracy": correct / max(count, 1), "examples": count, "source": source}
