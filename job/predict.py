"""python -m job predict WORKDIR_OR_EXPORT IMAGE_OR_FOLDER ...: the top classes, by name, of image files.

WORKDIR_OR_EXPORT is a workdir (a path or an s3://, gs:// URI: its export/ is used), an
export folder, a model.keras file, a SavedModel folder (export/saved_model) or a LiteRT file
(export/model_float16.tflite, model_int8.tflite: job.litert). The class names and the channel
count the model takes come from the run's record beside the model (export/run.json). Each image
(JPEG, PNG, GIF, BMP; any size and mode) is decoded to that many channels and given to the
model as it is: the exported model resizes and scales it exactly as training did. A LiteRT file
takes one fixed size (the dataset's): an image of another size is first scaled to cover it and
centre-cropped, as the data pipeline caches images larger or of varying size. A file that does
not decode gets an error line of its own; the others are still answered.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator

from job import storage
from job.errors import NothingToLoad
from job.image_folder import SUFFIXES


def _model_and_record(location: str, workdir: storage.Workdir) -> tuple[str, dict]:
    """(model path, run record) for a workdir, an export folder, a SavedModel folder or a model file."""
    if location.endswith((".keras", ".tflite")):
        model_path = location
    elif not storage.is_uri(location) and os.path.isfile(os.path.join(location, "saved_model.pb")):
        model_path = location.rstrip("/")
    elif not storage.is_uri(location) and os.path.isfile(os.path.join(location, "model.keras")):
        model_path = os.path.join(location, "model.keras")
    else:
        workdir.pull("export")
        model_path = workdir.path("export", "model.keras")
    if not os.path.exists(model_path):
        raise NothingToLoad(f"{location!r}: no exported model (looked for {model_path}); run `python -m job export` first")
    try:
        with open(os.path.join(os.path.dirname(model_path), "run.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    return model_path, record


def image_files(paths: list[str]) -> list[str]:
    """The files named, and the image files under the folders named (sorted)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                            if f.lower().endswith(SUFFIXES))
        else:
            found.append(path)
    return found


def predict(location: str, paths: list[str], top_k: int) -> Iterator[dict]:
    """For each image file: {"path", "top": [{"class", "index", "probability"}...]} or {"path", "error"}."""
    import keras
    import numpy as np
    import tensorflow as tf

    import job.export  # noqa: F401 - registers the serving model's preprocessing layer

    workdir = storage.Workdir.open(location)
    try:
        model_path, record = _model_and_record(location, workdir)
        size = None  # (height, width) a LiteRT file takes; the others take any size
        if model_path.endswith(".tflite"):
            from job.litert import LiteRTModel, fit_image

            model = LiteRTModel(model_path)
            *size, channels = model.input_shape
            num_classes = model.num_classes
        elif os.path.isdir(model_path):  # a SavedModel
            saved = tf.saved_model.load(model_path)
            model = lambda images: saved.serve(tf.constant(images))  # noqa: E731
            channels = (record.get("image_shape") or [None])[-1] or 3
            num_classes = record.get("num_classes") or len(saved.class_names().numpy())
        else:
            keras_model = keras.models.load_model(model_path)
            model = lambda images: keras_model(images, training=False)  # noqa: E731
            channels, num_classes = keras_model.input_shape[-1] or 3, keras_model.output_shape[-1]
        names = record.get("class_names") or [str(i) for i in range(num_classes)]
        for path in image_files(paths):
            try:
                image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
            except (tf.errors.OpError, ValueError) as err:
                reason = re.sub(r"\{\{.*?\}\}\s*", "", str(err).splitlines()[0]).strip()[:120]  # TF's op prefix
                yield {"path": path, "error": f"cannot read it as an image ({reason})"}
                continue
            if size:
                image = fit_image(image, *size)
            probabilities = np.asarray(model(np.asarray(image)[None]))[0]
            best = np.argsort(-probabilities)[:top_k]
            yield {"path": path, "top": [{"class": names[i], "index": int(i), "probability": float(probabilities[i])}
                                         for i in best]}
    finally:
        workdir.close()


def format_line(result: dict) -> str:
    if "error" in result:
        return f"{result['path']}: error: {result['error']}"
    return f"{result['path']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
