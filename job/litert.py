"""LiteRT (the TensorFlow Lite runtime) files of the serving model, for phones and edge devices.

`python -m job export CONFIG --litert float16,int8` (or `export.litert: [float16, int8]`)
writes, beside the SavedModel:
  export/model_float16.tflite  weights in float16, computed in float32 by the CPU runtime
  export/model_int8.tflite     post-training int8 quantization, calibrated on the first
                               `export.representative_images` images of data.train_split: int8
                               weights and activations except the ops below left in float32
Each takes a batch of raw uint8 images of the size the dataset's images are served at (CIFAR-10:
32x32x3; the size `evaluate` feeds, job.data.cache_size) and returns float32 class
probabilities. The serving model's own layers are converted: the upscaling and sharpening
(job.preprocess, constant matrices once the input size is fixed), the classifier, and with
model.flip_tta the mirror-image average. Nothing is left outside the file.

The int8 file is not full-integer by default. Full-integer int8 lost 2.6 points on a
short-trained quick-recipe model and 1.6 on the `make train` one (goal: 1). By default the
upscaling and sharpening (export.int8_preprocessing=float, about half that loss) and the
backbone's first convolutions (export.int8_float_layers, where int8 erred most per layer) stay
float32 (docs/stack.md has the measurements); the export log says which.
export.int8_preprocessing=int8 export.int8_float_layers=[] gives the full-integer file.

Full-integer: the input is uint8 with scale 1 and zero point 0 (the raw pixel value;
`_representative` makes sure calibration sees 0 and 255). Otherwise the uint8 input is cast
inside, as in float16. Either way the output is dequantized to float32 probabilities (a uint8
softmax would round them to 1/256).

Then, unless export.measure=false, each file is read back through the LiteRT interpreter of
the `ai-edge-litert` package (not TensorFlow's deprecated tf.lite.Interpreter) and the export
logs and writes export/litert.json: size, accuracy on data.eval_split next to the SavedModel's,
and median latency per image (batch 1) on this machine's CPU. Every failure (an op LiteRT
lacks, the package missing, a file the runtime refuses) is a LiteRTError: one line; the
SavedModel written before is kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import tempfile
import time
from typing import Callable

import numpy as np

from job.errors import LiteRTError

log = logging.getLogger(__name__)

KINDS = ("float16", "int8")
RUNTIME_PIN = "ai-edge-litert==2.3.0"  # the version pyproject.toml pins and this was measured with


def file_name(kind: str) -> str:
    return f"model_{kind}.tflite"


def interpreter_class():
    """ai_edge_litert's Interpreter, or a one-line LiteRTError saying how to install it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as err:
        raise LiteRTError(f"the LiteRT runtime is not installed (import ai_edge_litert: {err}): "
                          f"pip install {RUNTIME_PIN}") from None
    return Interpreter


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The converter's own complaint, e.g. "'tf.MatrixDeterminant' op is neither a custom op nor a
    flex op (ops LiteRT lacks: MatrixDeterminant)", out of its many lines of MLIR locations and notes."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    errors = [line for line in lines if "error:" in line]
    line = errors[0].split("error:", 1)[1].strip() if errors else lines[0]
    line = re.sub(r"^loc\(.*\)\s*:\s*", "", line)  # the MLIR location of the op, up to its last "):"
    missing = [l.split(":", 1)[1].strip() for l in lines if l.startswith("TF Select ops:")]
    if missing:
        line += f" (ops LiteRT lacks: {missing[0]})"
    return line[:limit]


def served_shape(config, record: dict) -> tuple[int, int, int]:
    """(height, width, channels) of the images the files take: those `evaluate` and training feed
    (the dataset's own size, or the cache size images larger or of varying size are resized to)."""
    from job.data import cache_size

    shape = tuple(record["image_shape"])
    size = cache_size(config.data, shape, config.model.image_size)
    height, width = (size, size) if size else shape[:2]
    return int(height), int(width), int(shape[2] or 3)


def _representative(config, shape: tuple[int, int, int]) -> np.ndarray:
    """The first `export.representative_images` images of the train split, uint8 (n, h, w, c).

    The int8 input's quantization is calibrated from the range of these images: one pixel of
    the first image is set to 0 and one to 255 if no image has them, so that range is the full
    one and the uint8 input is the raw pixel (scale 1, zero point 0), not a rescaled one.
    """
    from job import data as data_lib

    count = config.export.representative_images
    ds = data_lib.load_images(config.data, config.data.train_split, image_size=config.model.image_size, first=count)
    images = np.concatenate([batch.numpy() for batch, _ in ds.batch(256)])
    if images.shape[1:] != shape:
        raise LiteRTError(f"representative images are {images.shape[1:]}, the model takes {shape}")
    if images.min() > 0:
        images[0, 0, 0, 0] = 0
    if images.max() < 255:
        images[0, 0, 1, 0] = 255
    return images


def convert(model, config, record: dict, kind: str, representative: np.ndarray | None = None) -> bytes:
    """The .tflite bytes of the serving model of `model` (a TransferModel), or a one-line LiteRTError."""
    import keras
    import tensorflow as tf

    from job.export import serving_model

    height, width, channels = served_shape(config, record)
    # Full-integer int8: a float32 input the converter quantizes to uint8 (a uint8 input cast
    # inside the graph would leave a float CAST at the front of an integer model); otherwise
    # uint8 as it comes, cast to float inside.
    full_integer = kind == "int8" and is_full_integer(config)
    dtype = "float32" if full_integer else "uint8"
    served = serving_model(model, config, channels, size=(height, width), dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="litert-") as scratch:
        # Through a SavedModel written by Keras' ExportArchive: it tracks every weight, so the
        # converter freezes them all as constants. from_concrete_functions on a Keras 3 model
        # left them as READ_VARIABLE ops reading nothing (NaN out; calibration failed).
        archive = keras.export.ExportArchive()
        archive.track(served)
        archive.add_endpoint("litert", lambda images: served(images, training=False),
                             input_signature=[tf.TensorSpec([None, height, width, channels], dtype)])
        archive.write_out(scratch, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(scratch, signature_keys=["litert"])
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if kind == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif not full_integer:
            try:
                return _int8_with_float_ops(scratch, converter, representative, config)
            except LiteRTError:
                raise
            except Exception as err:
                raise LiteRTError(f"LiteRT int8 conversion failed: {_one_line(err)}") from None
        else:
            samples = representative.astype(np.float32)
            converter.representative_dataset = lambda: ([samples[i:i + 1]] for i in range(len(samples)))
            # Integer kernels only: an op without one fails the conversion instead of silently
            # staying float.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.float32
        try:
            return converter.convert()
        except Exception as err:  # ConverterError, RuntimeError from calibration, ValueError: all one line
            raise LiteRTError(f"LiteRT {kind} conversion failed: {_one_line(err)}") from None


def is_full_integer(config) -> bool:
    return config.export.int8_preprocessing == "int8" and not config.export.int8_float_layers


def float_ops_description(config) -> str:
    """What the int8 file leaves in float32, for the log: "full-integer", or e.g. "not full-integer,
    float32: upscaling and sharpening; layers Conv1, expanded_conv_depthwise"."""
    if is_full_integer(config):
        return "full-integer"
    kept = ["upscaling and sharpening"] if config.export.int8_preprocessing == "float" else []
    layers = config.export.int8_float_layers
    kept += [f"layer{'s' if len(layers) > 1 else ''} {', '.join(layers)}"] if layers else []
    return f"not full-integer, float32: {'; '.join(kept)}"


def _layer_pattern(layer: str):
    """A Keras layer's scope in the converted ops' names: ".../<layer>/..." or ".../<layer>_1/..."."""
    return re.compile(rf"/{re.escape(layer)}(_\d+)?/")


def _int8_with_float_ops(saved_model: str, converter, representative: np.ndarray, config) -> bytes:
    """int8 with chosen ops left float32: the upscaling and sharpening (export.int8_preprocessing=float)
    and the layers of export.int8_float_layers.

    The converter cannot leave chosen ops float; TensorFlow's quantization debugger can
    (`denylisted_nodes`): the ops' outputs, named after their layers in the float model (a
    convolution fused with its BatchNorm and ReLU6 is one op, named after all three). uint8 in
    (cast inside, as in float16), float32 out.
    """
    import tensorflow as tf

    Interpreter = interpreter_class()
    plain = Interpreter(model_content=tf.lite.TFLiteConverter.from_saved_model(
        saved_model, signature_keys=["litert"]).convert())
    names = {t["index"]: t["name"] for t in plain.get_tensor_details()}
    outputs = sorted({names[o] for op in plain._get_ops_details() for o in op["outputs"]})
    wanted = {"to_model_input": "export.int8_preprocessing=float"} if config.export.int8_preprocessing == "float" else {}
    wanted.update({layer: "export.int8_float_layers" for layer in config.export.int8_float_layers})
    denied = set()
    for layer, setting in wanted.items():
        found = [name for name in outputs if _layer_pattern(layer).search(name)]
        if not found:
            raise LiteRTError(f"LiteRT int8 conversion failed: {setting}: the model has no layer {layer!r} "
                              "to keep in float32")
        denied.update(found)
    samples = lambda: ([representative[i:i + 1]] for i in range(len(representative)))  # noqa: E731
    converter.representative_dataset = samples
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=samples,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=sorted(denied)))
    return debugger.get_nondebug_quantized_model()


class LiteRTModel:
    """A .tflite file in the ai-edge-litert interpreter: uint8 images (n, h, w, c) -> float32 probabilities."""

    def __init__(self, path: str, threads: int = 1):
        Interpreter = interpreter_class()
        if not os.path.isfile(path):
            raise LiteRTError(f"no LiteRT model at {path}")
        try:
            self.interpreter = Interpreter(model_path=path, num_threads=threads)
        except (ValueError, RuntimeError) as err:
            raise LiteRTError(f"{path}: LiteRT cannot load it ({_one_line(err)})") from None
        self.path = path
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])  # (h, w, c)
        self.num_classes = int(self._output["shape"][-1])
        self._batch = None

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.shape[1:] != self.input_shape:
            raise LiteRTError(f"{os.path.basename(self.path)} takes images of {self.input_shape}, "
                              f"got {images.shape[1:]}")
        if images.shape[0] != self._batch:  # the batch dimension is free; other dimensions fixed
            self.interpreter.resize_tensor_input(self._input["index"], [images.shape[0], *self.input_shape])
            self.interpreter.allocate_tensors()
            self._batch = images.shape[0]
        scale, zero = self._input["quantization"]
        dtype = np.dtype(self._input["dtype"])
        if dtype.kind in "iu" and scale and (scale, zero, dtype) != (1.0, 0, np.uint8):
            # Not written by this module (its int8 input is the raw pixel): quantize as the file says.
            limits = np.iinfo(dtype)
            images = np.clip(np.round(images / scale + zero), limits.min, limits.max)
        try:
            self.interpreter.set_tensor(self._input["index"], images.astype(self._input["dtype"]))
            self.interpreter.invoke()
        except (ValueError, RuntimeError) as err:
            raise LiteRTError(f"{os.path.basename(self.path)}: LiteRT cannot run it ({_one_line(err)})") from None
        out = self.interpreter.get_tensor(self._output["index"])
        scale, zero = self._output["quantization"]
        if self._output["dtype"] != np.float32 and scale:
            return ((out.astype(np.float32) - zero) * scale).astype(np.float32)
        return out.astype(np.float32)


def fit_image(image, height: int, width: int):
    """An image of another size as a file takes it: shorter side scaled to cover (height, width),
    centre crop, uint8 (as job.data caches images larger or of varying size)."""
    import tensorflow as tf

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    if int(shape[0]) == height and int(shape[1]) == width:
        return image
    scale = tf.reduce_max(tf.constant([height, width], tf.float32) / shape)
    resized = tf.image.resize(image, tf.cast(tf.math.ceil(shape * scale), tf.int32), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(tf.image.resize_with_crop_or_pad(resized, height, width)), 0, 255),
                   tf.uint8)


def accuracy(predict: Callable, config, split: str, batch: int = 64) -> tuple[float, int]:
    """(accuracy, examples) of `predict` (uint8 batch -> probabilities) on `split`, fed as evaluate feeds it."""
    from job import data as data_lib

    correct = count = 0
    for images, labels in data_lib.load_images(config.data, split, image_size=config.model.image_size).batch(batch):
        predicted = np.argmax(predict(images.numpy()), axis=-1)
        correct += int(np.sum(predicted == labels.numpy()))
        count += int(labels.shape[0])
    return correct / max(count, 1), count


def median_latency_ms(predict: Callable, image: np.ndarray, runs: int) -> float:
    """Median wall time of `predict` on one image (batch 1), after 3 untimed calls."""
    for _ in range(3):
        predict(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(image)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def write(model, config, record: dict, export_dir: str) -> list[dict]:
    """Write export/model_<kind>.tflite for each kind of export.litert, then (export.measure)
    measure them next to export_dir/saved_model; the rows, also in export/litert.json."""
    kinds = [k for k in KINDS if k in config.export.litert]
    interpreter_class()  # before converting: a missing runtime is one line, not a file nobody checked
    shape = served_shape(config, record)
    representative = _representative(config, shape) if "int8" in kinds else None
    for kind in kinds:
        blob = convert(model, config, record, kind, representative)
        with open(os.path.join(export_dir, file_name(kind)), "wb") as f:
            f.write(blob)
        log.info("wrote %s (%.2f MB%s)", os.path.join(export_dir, file_name(kind)), len(blob) / 1e6,
                 f"; {float_ops_description(config)}" if kind == "int8" else "")
    if not config.export.measure:
        return []
    rows = measure(config, export_dir, kinds, shape)
    with open(os.path.join(export_dir, "litert.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def measure(config, export_dir: str, kinds: list[str], shape: tuple[int, int, int]) -> list[dict]:
    """Size, accuracy on data.eval_split and median latency per image of the SavedModel and each file; logged."""
    import tensorflow as tf

    split, runs = config.data.eval_split, config.export.latency_runs
    saved = tf.saved_model.load(os.path.join(export_dir, "saved_model"))
    candidates = [("saved_model", os.path.join(export_dir, "saved_model"),
                   lambda images: saved.serve(tf.constant(images)).numpy(), "TensorFlow, its default threads")]
    for kind in kinds:
        path = os.path.join(export_dir, file_name(kind))
        runtime = f"LiteRT, {config.export.threads} thread{'s' if config.export.threads > 1 else ''}"
        if kind == "int8":
            runtime += f"; {float_ops_description(config)}"
        candidates.append((kind, path, LiteRTModel(path, config.export.threads), runtime))
    image = next(_first_image(config))[None]  # one image of the split, for the latency
    rows = []
    for kind, path, predict, runtime in candidates:
        acc, examples = accuracy(predict, config, split)
        rows.append({"model": kind, "file": os.path.basename(path), "bytes": _size(path), "split": split,
                     "examples": examples, "accuracy": acc, "latency_ms": median_latency_ms(predict, image, runs),
                     "latency_runs": runs, "runtime": runtime})
    log.info("on %s (%d images); latency: median of %d calls at batch 1 on this CPU", split, rows[0]["examples"], runs)
    for row in rows:
        log.info("  %-22s %8.2f MB  accuracy %6.2f%% (%+.2f points)  %7.2f ms/image  (%s)", row["file"],
                 row["bytes"] / 1e6, 100 * row["accuracy"], 100 * (row["accuracy"] - rows[0]["accuracy"]),
                 row["latency_ms"], row["runtime"])
    return rows


def _first_image(config):
    from job import data as data_lib

    for image, _ in data_lib.load_images(config.data, config.data.eval_split, image_size=config.model.image_size).take(1):
        yield image.numpy()
