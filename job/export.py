"""Export a trained workdir as a model that serves raw images, and evaluate a workdir.

Export rebuilds the model outside any distribution strategy in float32, restores the
newest checkpoint that reads back (warning about damaged ones), and writes:
  <workdir>/export/model.keras     Keras 3 file: uint8 images in, probabilities out
                                   (its first layer is job's ToModelInput: load it with job installed)
  <workdir>/export/saved_model/    TF SavedModel with a `serve` endpoint, for TF Serving
  <workdir>/export/model_<kind>.tflite  with export.litert (`--litert float16,int8`): LiteRT
                                   files for phones, measured against the SavedModel (job.litert)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Union

import keras
import numpy as np
import tensorflow as tf

from job import data as data_lib
from job.checkpoints import checkpoints_to_try, restore_newest
from job.config import Config
from job.errors import LiteRTError, NoReadableCheckpoint, NothingToLoad
from job.model import TransferModel, build_model, set_backbone_trainable
from job.preprocess import to_model_input
from job.resume import RUN_RECORD, read_run_record
from job.storage import Workdir

log = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="job")
class ToModelInput(keras.layers.Layer):
    """job.preprocess.to_model_input as the serving model's first layer: the same function as in training."""

    def __init__(self, image_size: int, method: str = "bilinear", sharpen: float = 0.0, sharpen_size: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.method, self.sharpen, self.sharpen_size = image_size, method, float(sharpen), sharpen_size

    def call(self, images):
        return to_model_input(images, self.image_size, "float32", self.method, self.sharpen, self.sharpen_size)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "method": self.method, "sharpen": self.sharpen,
                "sharpen_size": self.sharpen_size}


@keras.saving.register_keras_serializable(package="job")
class MirrorImage(keras.layers.Layer):
    """Left-right mirror of an NHWC batch. Unused since WithMirrorImages; kept registered so
    model.keras files exported before (their TTA mirrored in a second branch) still load."""

    def call(self, images):
        return keras.ops.flip(images, axis=2)


@keras.saving.register_keras_serializable(package="job")
class WithMirrorImages(keras.layers.Layer):
    """A batch of n images -> 2n: the images, then their mirror images (one forward pass for both)."""

    def call(self, images):
        return keras.ops.concatenate([images, keras.ops.flip(images, axis=2)], axis=0)


@keras.saving.register_keras_serializable(package="job")
class MeanOfHalves(keras.layers.Layer):
    """2n rows -> n: the mean of row i and row n + i (an image's and its mirror image's probabilities)."""

    def call(self, rows):
        plain, mirrored = keras.ops.split(rows, 2, axis=0)
        return (plain + mirrored) / 2


def serving_model(model: TransferModel, config: Config, channels: int = 3, size: tuple = (None, None),
                  dtype: str = "uint8") -> keras.Model:
    """Raw uint8 images of any size in, class probabilities out: upscaled as in training
    (data.resize_method, data.sharpen), the mean over the image and its mirror image with
    model.flip_tta. `size` (height, width) fixes the input size and `dtype` its type (float32:
    pixel values 0..255 as floats) for job.litert's files.

    Freezes `model`: a frozen BatchNorm runs in inference mode whatever `training` value
    Keras passes down the nested graphs (seen: an unfrozen one here used batch statistics).
    """
    set_backbone_trainable(model, False)
    d = config.data
    raw = keras.Input((*size, channels), dtype=dtype, name="raw_image")
    x = ToModelInput(config.model.image_size, d.resize_method, d.sharpen, d.sharpen_size, name="to_model_input")(raw)
    if config.model.flip_tta:
        # One batch of the images and their mirror images: one forward pass in the graph (the
        # SavedModel traces and writes the classifier once) and larger matmuls at serving.
        x = WithMirrorImages(name="with_mirror_images")(x)
    # training=False recorded in the graph: otherwise a caller's default training=None lets the
    # nested head resolve dropout as active (seen with Keras 3.15: two calls, two answers).
    probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(model.classifier(x, training=False))
    if config.model.flip_tta:
        probabilities = MeanOfHalves(name="flip_tta")(probabilities)
    return keras.Model(raw, probabilities, name="serving")


def exported_model_path(workdir: Workdir) -> str:
    return workdir.path("export", "model.keras")


def restore_classifier(config: Config, workdir: str, checkpoint: Optional[str] = None):
    """A float32 TransferModel holding the weights of `checkpoint` (default: the newest in the
    local directory `workdir`/checkpoints that reads back, past damaged ones, as training
    resumes), that checkpoint's path, and the run's record (its classes)."""
    directory = os.path.join(workdir, "checkpoints")
    if checkpoint is None and not checkpoints_to_try(directory):
        raise NothingToLoad(f"workdir {workdir!r}: no checkpoint in {directory}")
    # The classes are in the run's record; a workdir without one asks the dataset.
    record = read_run_record(workdir)
    if record is None:
        info = data_lib.dataset_info(config.data, [])
        record = {"dataset": config.data.name, "num_classes": info.num_classes, "class_names": list(info.class_names),
                  "image_shape": list(info.image_shape)}
    # weights="none": the checkpoint holds every weight, no need to read ImageNet's.
    model = build_model(config.model, record["num_classes"], weights="none")
    reader = tf.train.Checkpoint(model=model.classifier)
    if checkpoint is not None:
        reader.restore(checkpoint).expect_partial().assert_existing_objects_matched()
        return model, checkpoint, record
    return model, restore_newest(reader, directory, partial=True), record


def write_saved_model(served: keras.Model, record: dict, path: str) -> None:
    """A SavedModel for TF Serving: `serve` (uint8 images of any size -> probabilities) and
    `class_names` (the names of the classes, in the order of the probabilities)."""
    archive = keras.export.ExportArchive()
    archive.track(served)
    archive.add_endpoint("serve", served.call,
                         input_signature=[tf.TensorSpec([None, None, None, served.input_shape[-1]], tf.uint8)])
    names = tf.constant([str(n) for n in record["class_names"]] or [str(i) for i in range(record["num_classes"])])
    archive.add_endpoint("class_names", tf.function(lambda: names), input_signature=[])
    archive.write_out(path, verbose=False)


def export(config: Config, location: Union[str, Workdir]) -> str:
    """Write the serving model of the workdir's newest checkpoint into <workdir>/export; its location."""
    workdir = location if isinstance(location, Workdir) else Workdir.open(location)
    try:
        workdir.pull("checkpoints")
        workdir.pull(RUN_RECORD)
        model, latest, record = restore_classifier(config, workdir.local)
        served = serving_model(model, config, channels=record["image_shape"][-1] or 3)
        os.makedirs(workdir.path("export"), exist_ok=True)
        served.save(exported_model_path(workdir))
        write_saved_model(served, record, workdir.path("export", "saved_model"))
        with open(workdir.path("export", RUN_RECORD), "w") as f:
            json.dump(record, f, indent=1)
        workdir.push("export")
        log.info("exported %s to %s", latest, workdir.uri("export"))
        if config.export.litert:
            # After the SavedModel is written and pushed: a LiteRT failure never costs it.
            from job import litert

            try:
                litert.write(model, config, record, workdir.path("export"))
            except LiteRTError as err:
                raise LiteRTError(f"{err} (the SavedModel export in {workdir.uri('export')} is complete)") from None
            finally:
                workdir.push("export")
        return workdir.uri("export")
    finally:
        if workdir is not location:
            workdir.close()


def load_exported(path: str) -> keras.Model:
    if not os.path.isfile(path):
        raise NothingToLoad(f"no exported model at {path}")
    return keras.models.load_model(path)


def load_model_file(path: str):
    """(uint8 images -> probabilities, source) of a .tflite file, a SavedModel folder or a model.keras file."""
    if path.endswith(".tflite"):
        from job.litert import LiteRTModel

        return LiteRTModel(path), path
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        saved = tf.saved_model.load(path)
        return (lambda images: saved.serve(tf.constant(images)).numpy()), path
    if path.endswith(".keras"):
        served = load_exported(path)
        return (lambda images: np.asarray(served(images, training=False))), path
    raise NothingToLoad(f"{path!r}: not a .tflite file, a SavedModel folder or a .keras file")


def evaluate(config: Config, location: str, split: str, model_path: Optional[str] = None) -> dict:
    """Accuracy of the workdir's latest checkpoint (else its exported model) on `split`; of the
    model file `model_path` (.tflite, SavedModel folder, .keras) instead, if given."""
    if model_path is not None:
        from job.litert import accuracy

        predict, source = load_model_file(model_path)
        acc, count = accuracy(predict, config, split, batch=256)
        return {"split": split, "accuracy": acc, "examples": count, "source": source}
    workdir = Workdir.open(location)
    try:
        workdir.pull("checkpoints")
        workdir.pull(RUN_RECORD)
        try:
            model, source, record = restore_classifier(config, workdir.local)
            served = serving_model(model, config, channels=record["image_shape"][-1] or 3)
        except (NothingToLoad, NoReadableCheckpoint) as err:
            if not workdir.pull("export/model.keras"):
                if isinstance(err, NoReadableCheckpoint):
                    raise
                raise NothingToLoad(f"workdir {location!r}: neither a checkpoint nor an exported model") from None
            if isinstance(err, NoReadableCheckpoint):
                log.warning("%s; evaluating the exported model instead", err)
            served, source = load_exported(exported_model_path(workdir)), workdir.uri("export", "model.keras")
        # At the size training cached them (varying sizes cannot be batched); the model resizes.
        raw = data_lib.load_images(config.data, split, image_size=config.model.image_size).batch(256)
        correct = count = 0
        for images, labels in raw:
            predicted = np.argmax(served(images, training=False), axis=-1)
            correct += int(np.sum(predicted == labels.numpy()))
            count += int(labels.shape[0])
        return {"split": split, "accuracy": correct / max(count, 1), "examples": count, "source": source}
    finally:
        workdir.close()
