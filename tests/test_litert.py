"""LiteRT files (job.litert): a small trained workdir exported to float16 and int8, read back
through the ai-edge-litert interpreter, compared with the SavedModel; predict and evaluate on
a .tflite file; the one-line failures.

The trained workdir uses the real ImageNet weights (alpha 1.0, 48 px, upscaled bicubic and
sharpened, flip TTA): a random-weight tiny model gives near-uniform probabilities (seen: top
two 5e-5 apart), on which an int8 top class means nothing. Its head trains 10 epochs on 256
images, so those images get confident answers (seen: 52% on held-out images).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from tests.conftest import DATASETS, KERAS_HOME, REAL_WEIGHTS, WEIGHTS, run_job, tiny

REAL = {"TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME)}
RUN = tiny(REAL_WEIGHTS, "model.image_size=48", "data.resize_method=bicubic", "data.sharpen=2.0", "model.flip_tta=true",
           "train.head.epochs=10", "train.head.learning_rate=0.003", "train.finetune.epochs=0",
           "checkpoint.every_steps=400")
EXPORT = [*RUN, "data.eval_split=train[49872:]", "export.representative_images=32", "export.latency_runs=5"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained workdir exported with --litert float16,int8; (workdir, export's CompletedProcess)."""
    if not WEIGHTS.is_file() or not (DATASETS / "cifar10").is_dir():
        pytest.skip("offline CIFAR-10 and weights not found next to this checkout")
    workdir = tmp_path_factory.mktemp("litert")
    run_job("train", "configs/tiny.yaml", f"workdir={workdir}", *RUN, env=REAL, check=True)
    result = run_job("export", "configs/tiny.yaml", f"workdir={workdir}", *EXPORT, "--litert", "float16,int8",
                     env=REAL, check=True)
    return workdir, result


@pytest.fixture(scope="module")
def train_images(exported):
    """16 of the images the head trained on, uint8 32x32x3."""
    import tensorflow_datasets as tfds

    ds = tfds.load("cifar10", split="train[:16]", data_dir=str(DATASETS))
    return np.stack([example["image"].numpy() for example in ds])


@pytest.mark.real_data
def test_export_writes_both_files_and_logs_size_accuracy_and_latency(exported):
    workdir, result = exported
    export = workdir / "export"
    assert (export / "saved_model" / "saved_model.pb").is_file()
    rows = {row["model"]: row for row in json.loads((export / "litert.json").read_text())}
    assert list(rows) == ["saved_model", "float16", "int8"]
    for kind in ("float16", "int8"):
        assert rows[kind]["bytes"] == (export / f"model_{kind}.tflite").stat().st_size
        assert rows[kind]["examples"] == 128 and rows[kind]["latency_ms"] > 0
        assert f"model_{kind}.tflite" in result.stderr and "ms/image" in result.stderr
    assert rows["int8"]["bytes"] < rows["saved_model"]["bytes"] / 3
    assert rows["float16"]["accuracy"] == pytest.approx(rows["saved_model"]["accuracy"], abs=0.02)


@pytest.mark.real_data
def test_files_take_raw_uint8_images_and_int8_keeps_only_the_named_ops_float(exported):
    from ai_edge_litert.interpreter import Interpreter

    for kind in ("float16", "int8"):
        interpreter = Interpreter(model_path=str(exported[0] / "export" / f"model_{kind}.tflite"))
        (given,), (answer,) = interpreter.get_input_details(), interpreter.get_output_details()
        assert given["dtype"] == np.uint8 and list(given["shape"][1:]) == [32, 32, 3]
        assert answer["dtype"] == np.float32 and answer["shape"][-1] == 10
    # The default int8 file: float32 only in the upscaling and sharpening and the four named
    # backbone layers (export.int8_float_layers), int8 elsewhere; and the export log says so.
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    float_ops = {tensors[o]["name"] for op in interpreter._get_ops_details() for o in op["outputs"]
                 if tensors[o]["dtype"] == np.float32 and op["op_name"] != "DEQUANTIZE"} - {answer["name"]}
    layers = ("to_model_input", "Conv1", "expanded_conv_depthwise", "block_2_depthwise", "expanded_conv_project")
    owner = {name: [layer for layer in layers if re.search(rf"/{layer}(_\d+)?/", name)] for name in float_ops}
    assert all(owner.values()), [name for name, found in owner.items() if not found]
    assert {layer for found in owner.values() for layer in found} == set(layers)
    assert sum(t["dtype"] == np.int8 for t in tensors.values()) > 100  # the rest of the classifier is int8
    assert ("not full-integer, float32: upscaling and sharpening; layers Conv1, expanded_conv_depthwise, "
            "block_2_depthwise, expanded_conv_project" in exported[1].stderr)


@pytest.mark.real_data
def test_both_files_agree_with_the_saved_model(exported, train_images, real_env):
    import tensorflow as tf

    from job.litert import LiteRTModel

    export = exported[0] / "export"
    saved = tf.saved_model.load(str(export / "saved_model"))  # kept: its functions need its variables alive
    expected = saved.serve(tf.constant(train_images)).numpy()
    assert np.median(np.sort(expected)[:, -1]) > 0.5  # confident answers: the comparison means something
    float16 = LiteRTModel(str(export / "model_float16.tflite"))(train_images)
    # Not 1e-2 everywhere: float16 weights move a few probabilities by more (seen: 0.0125 here, 2
    # of 160; 0.030 on 200 held-out images, the same with the preprocessing left in float32, so
    # it is the backbone's weights). Typically far less, and the same top class.
    np.testing.assert_allclose(float16, expected, atol=2e-2)
    assert np.mean(np.abs(float16 - expected)) < 2e-3
    np.testing.assert_array_equal(float16.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(float16.sum(axis=1), 1.0, atol=1e-4)
    int8 = LiteRTModel(str(export / "model_int8.tflite"))(train_images)
    assert np.mean(int8.argmax(axis=1) == expected.argmax(axis=1)) >= 0.75
    # One image at a time (batch 1, as the latency is measured) gives the batch's answers.
    np.testing.assert_allclose(LiteRTModel(str(export / "model_int8.tflite"))(train_images[:1]), int8[:1], atol=1e-6)


@pytest.mark.real_data
def test_full_integer_int8_when_nothing_is_kept_float(exported, train_images, real_env):
    import tensorflow as tf

    from job import litert
    from job.config import load_config
    from job.export import restore_classifier

    workdir = exported[0]
    # data_dir named: TFDS read TFDS_DATA_DIR when this process imported it, maybe before real_env.
    config = load_config("configs/tiny.yaml", [*EXPORT, "export.int8_preprocessing=int8", "export.int8_float_layers=[]",
                                               f"data.data_dir={DATASETS}"])
    assert litert.float_ops_description(config) == "full-integer"
    model, _, record = restore_classifier(config, str(workdir))
    blob = litert.convert(model, config, record, "int8", litert._representative(config, (32, 32, 3)))
    (workdir / "full_integer.tflite").write_bytes(blob)
    served = litert.LiteRTModel(str(workdir / "full_integer.tflite"))
    # The raw pixel value in (uint8, scale 1, zero point 0), and every tensor but the output integer.
    assert served._input["dtype"] == np.uint8 and served._input["quantization"] == (1.0, 0)
    assert [t["name"] for t in served.interpreter.get_tensor_details() if t["dtype"] == np.float32] == [
        served._output["name"]]
    saved = tf.saved_model.load(str(workdir / "export" / "saved_model"))
    expected = saved.serve(tf.constant(train_images)).numpy()
    assert np.mean(served(train_images).argmax(axis=1) == expected.argmax(axis=1)) >= 0.75


@pytest.mark.real_data
def test_predict_and_evaluate_take_a_tflite_file(exported, train_images, tmp_path):
    import tensorflow as tf

    workdir, _ = exported
    export = workdir / "export"
    for i, image in enumerate(train_images[:2]):
        tf.io.write_file(str(tmp_path / f"{i}.png"), tf.io.encode_png(image))
    # Twice the size the file takes: scaled and centre-cropped to 32x32 first.
    tf.io.write_file(str(tmp_path / "large.png"), tf.io.encode_png(np.repeat(np.repeat(train_images[2], 2, 0), 2, 1)))
    predicted = run_job("predict", str(export / "model_int8.tflite"), str(tmp_path), "--json", check=True)
    results = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [r["path"].rsplit("/", 1)[1] for r in results] == ["0.png", "1.png", "large.png"]
    assert all(len(r["top"]) == 3 and r["top"][0]["class"] in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                                "frog", "horse", "ship", "truck") for r in results)
    # The SavedModel folder is a model predict takes too; its top class is the float16 file's.
    saved = run_job("predict", str(export / "saved_model"), str(tmp_path / "0.png"), "--json", check=True)
    float16 = run_job("predict", str(export / "model_float16.tflite"), str(tmp_path / "0.png"), "--json", check=True)
    assert json.loads(saved.stdout)["top"][0]["class"] == json.loads(float16.stdout)["top"][0]["class"]

    report = run_job("evaluate", "configs/tiny.yaml", *EXPORT, "--model", str(export / "model_float16.tflite"),
                     env=REAL, check=True)
    scored = json.loads(report.stdout.strip().splitlines()[-1])
    logged = {row["model"]: row for row in json.loads((export / "litert.json").read_text())}["float16"]
    assert scored["source"].endswith("model_float16.tflite") and scored["examples"] == 128
    assert scored["accuracy"] == pytest.approx(logged["accuracy"], abs=1e-9)


@pytest.mark.real_data
def test_a_missing_runtime_is_one_line_and_the_saved_model_is_kept(exported, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(exported[0], workdir, ignore=shutil.ignore_patterns("export"))
    stub = tmp_path / "stub" / "ai_edge_litert"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'ai_edge_litert'\")\n")
    result = run_job("export", "configs/tiny.yaml", f"workdir={workdir}", *EXPORT, "--litert", "int8",
                     env={**REAL, "PYTHONPATH": str(tmp_path / "stub")})
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr)
    assert "the LiteRT runtime is not installed" in line and "pip install ai-edge-litert==" in line
    assert f"the SavedModel export in {workdir}/export is complete" in line
    assert (workdir / "export" / "saved_model" / "saved_model.pb").is_file()
    assert not list((workdir / "export").glob("*.tflite"))


def test_an_op_litert_lacks_is_one_line_naming_it(monkeypatch):
    import keras
    import tensorflow as tf

    import job.export
    from job import litert
    from job.config import load_config
    from job.errors import LiteRTError

    def with_determinant(model, config, channels, size, dtype):  # a serving model with an op LiteRT has no kernel for
        raw = keras.Input((*size, channels), dtype=dtype)
        x = keras.layers.Lambda(lambda t: tf.reshape(tf.cast(t[:, :3, :3, 0], "float32"), [-1, 3, 3]))(raw)
        return keras.Model(raw, keras.layers.Lambda(lambda t: tf.linalg.det(t)[:, None])(x))

    monkeypatch.setattr(job.export, "serving_model", with_determinant)
    with pytest.raises(LiteRTError) as failure:
        litert.convert(None, load_config(None, ["model.image_size=32"]), {"image_shape": [32, 32, 3]}, "float16")
    message = str(failure.value)
    assert "\n" not in message
    assert message == ("LiteRT float16 conversion failed: 'tf.MatrixDeterminant' op is neither a custom op nor a flex "
                       "op (ops LiteRT lacks: MatrixDeterminant)")


def test_an_unknown_litert_kind_is_one_line(tmp_path):
    result = run_job("export", "configs/tiny.yaml", f"workdir={tmp_path}", "--litert", "float16,int4")
    assert result.returncode == 2
    (line,) = _error_lines(result.stderr)
    assert line.startswith("error: export.litert.1='int4'") and "'float16' or 'int8'" in line


def test_an_int8_float_layer_the_model_lacks_is_one_line(monkeypatch):
    import keras

    import job.export
    from job import litert
    from job.config import load_config
    from job.errors import LiteRTError

    def small(model, config, channels, size, dtype):  # no MobileNetV2: the names are all that matter here
        raw = keras.Input((*size, channels), dtype=dtype)
        x = keras.layers.Rescaling(1 / 255, name="to_model_input")(keras.ops.cast(raw, "float32"))
        x = keras.layers.Dense(4, name="dense")(keras.layers.Flatten()(x))
        return keras.Model(raw, keras.layers.Dense(2, name="head")(x))

    monkeypatch.setattr(job.export, "serving_model", small)
    config = load_config(None, ["model.image_size=32", "export.int8_float_layers=[dense,Conv9]"])
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(LiteRTError) as failure:
        litert.convert(None, config, {"image_shape": [32, 32, 3]}, "int8", images)
    assert str(failure.value) == ("LiteRT int8 conversion failed: export.int8_float_layers: the model has no layer "
                                  "'Conv9' to keep in float32")
