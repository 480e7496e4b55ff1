"""Other image data than CIFAR-10: other TFDS sets (grayscale, varying sizes, large images), a
folder of one's own images in mixed formats, and predictions by class name."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from job import data as data_lib
from job.config import load_config
from tests.conftest import DATASETS, EXPORTS, REPO, job_env, run_job, tiny

MOCK = ["data.data_dir=/nonexistent/tfds", "data.eval_split=train", "train.batch_size=8", "train.head.epochs=1",
        "train.finetune.epochs=1", "model.image_size=32", "model.alpha=0.35", "model.weights=none",
        "telemetry.progress_bar=false", "telemetry.profile_steps=null"]


def _mock_cli(*args: str, examples: int = 40) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tests/mock_job.py", str(examples), *args], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name, channels", [("mnist", 1), ("tf_flowers", 3)])
def test_other_tfds_sets_train_export_evaluate_and_predict(tmp_path, name, channels):
    """mnist is grayscale (it used to fail in the first convolution), tf_flowers has images of
    varying size (it used to fail in the iterator)."""
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    common = [str(config), f"workdir={tmp_path / 'run'}", f"data.name={name}", *MOCK]
    trained = _mock_cli("train", *common)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert json.loads(trained.stdout.strip().splitlines()[-1])["status"] == "finished"
    evaluated = _mock_cli("evaluate", *common)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["examples"] == 40
    record = json.loads((tmp_path / "run" / "export" / "run.json").read_text())
    with tfds.testing.mock_data(num_examples=1):
        names = tfds.builder(name).info.features["label"].names
    assert record["class_names"] == names and record["image_shape"][-1] == channels
    image = tmp_path / "image.png"
    tf.io.write_file(str(image), tf.io.encode_png(np.random.default_rng(0).integers(0, 255, (45, 30, 3), np.uint8)))
    predicted = run_job("predict", str(tmp_path / "run"), str(image), "--json", "--top-k", "2")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    answer = json.loads(predicted.stdout.strip())
    assert answer["path"] == str(image) and [t["class"] in names for t in answer["top"]] == [True, True]


def test_large_images_are_cached_at_a_bounded_size(tmp_path):
    """beans (500x500) for a 32 px model: cached at 37x37 (32 x 8/7), within the size stated."""
    with tfds.testing.mock_data(num_examples=12):
        config = load_config(None, ["data.name=beans", "data.data_dir=/nonexistent/tfds", "model.image_size=32"])
        info = data_lib.dataset_info(config.data, ["train"])
        size = data_lib.cache_size(config.data, info.image_shape, 32)
        images = [image.numpy() for image, _ in data_lib.load_images(config.data, "train", image_size=32)]
    assert info.image_shape == (500, 500, 3) and size == 37
    assert {image.shape for image in images} == {(37, 37, 3)}
    assert sum(image.nbytes for image in images) <= data_lib.cache_bytes(info.split_sizes["train"], info.image_shape, size)


def test_random_resized_crops_keep_the_batch_shape_and_are_seeded():
    images = tf.constant(np.random.default_rng(1).integers(0, 255, (6, 37, 37, 3)), tf.uint8)
    seed = tf.constant([4, 2], tf.int64)
    out = data_lib.augment(images, "resized_crop", seed)
    assert out.shape == images.shape and out.dtype == tf.uint8
    np.testing.assert_array_equal(out, data_lib.augment(images, "resized_crop", seed))
    assert not np.array_equal(out, data_lib.augment(images, "flip", seed))  # it crops too


# --- a folder of one's own images ---------------------------------------------------------------


def _write(path, pixels: np.ndarray, fmt: str, mode: str) -> None:
    from PIL import Image

    image = Image.fromarray(pixels)
    image = {"L": image.convert("L"), "RGBA": image.convert("RGBA"), "P": image.convert("P"), "RGB": image}[mode]
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Real CIFAR-10 images of 3 classes as PATH/{train,test}/<class>/ files: PNG, JPEG, GIF and
    BMP; RGB, grayscale, RGBA and palette; 32x32 and upscaled to other sizes; one corrupt file."""
    if not (DATASETS / "cifar10").is_dir():
        pytest.skip("offline CIFAR-10 not found")
    root = tmp_path_factory.mktemp("images")
    names = tfds.builder("cifar10", data_dir=str(DATASETS)).info.features["label"].names
    wanted = {0: "airplane", 1: "automobile", 7: "horse"}
    counts = {label: 0 for label in wanted}
    formats = [("PNG", "RGB", "png"), ("JPEG", "L", "jpg"), ("GIF", "P", "gif"), ("BMP", "RGB", "bmp"),
               ("PNG", "RGBA", "png")]
    for image, label in tfds.as_numpy(tfds.load("cifar10", split="train[:2000]", data_dir=str(DATASETS),
                                                 download=False, as_supervised=True)):
        label = int(label)
        if label not in wanted or counts[label] >= 40:
            continue
        n = counts[label]
        counts[label] += 1
        fmt, mode, suffix = formats[n % len(formats)]
        pixels = image if n % 3 else np.asarray(tf.image.resize(image, (48 + n % 7, 40), method="bicubic")
                                                .numpy().clip(0, 255), np.uint8)
        split = "train" if n < 30 else "test"
        _write(root / split / names[label] / f"{n:03d}.{suffix}", pixels, fmt, mode)
    (root / "train" / "horse" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


@pytest.mark.real_data
def test_a_folder_of_mixed_images_trains_skips_the_broken_file_and_predicts_by_name(image_folder, tmp_path, real_env):
    workdir = tmp_path / "run"
    args = ["train", "configs/tiny.yaml", *tiny(f"data.image_dir={image_folder}", "data.train_split=train[:80%]",
                                                 "data.val_split=train[80%:]", "data.eval_split=test",
                                                 "train.batch_size=8", "data.name=my_images", EXPORTS), f"workdir={workdir}"]
    result = run_job(*args, env=real_env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"1 file(s) do not decode and are left out: {image_folder / 'train' / 'horse' / 'broken.jpg'}" in result.stderr
    assert re.search(r"decoded images \(uint8 37x37, [^)]*\) [0-9.]+ MB -> memory", result.stderr)  # varying sizes: one bounded size
    evaluated = run_job("evaluate", *args[1:], env=real_env, check=True)
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["examples"] == 30
    files = [str(image_folder / "test" / "horse" / "030.png"), str(image_folder / "test" / "airplane" / "031.jpg")]
    predicted = run_job("predict", str(workdir), *files, "--top-k", "3", env=real_env, check=True)
    lines = predicted.stdout.strip().splitlines()
    assert len(lines) == 2 and all(sorted(w for w in line.split()[1::2]) == ["airplane", "automobile", "horse"]
                                   for line in lines), lines


@pytest.mark.real_data
@pytest.mark.parametrize("case, expected", [
    ("empty", "no images; expected"),
    ("one_class", "one class (cat); a classifier needs at least two class folders"),
    ("no_split", "split 'validation' of data.image_dir="),
])
def test_a_folder_that_cannot_be_a_dataset_is_one_line(case, expected, tmp_path, real_env):
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True)
    if case == "one_class":
        _write(root / "train" / "cat" / "1.png", np.zeros((8, 8, 3), np.uint8), "PNG", "RGB")
    if case == "no_split":
        for label in ("cat", "dog"):
            _write(root / "train" / label / "1.png", np.zeros((8, 8, 3), np.uint8), "PNG", "RGB")
    result = run_job("train", "configs/tiny.yaml", *tiny(f"data.image_dir={root}", "data.train_split=train",
                                                          "data.val_split=validation"), f"workdir={tmp_path / 'run'}",
                     env=real_env)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "run").exists()


def test_a_sliced_folder_split_holds_every_class_and_keeps_a_common_image_size(tmp_path):
    """Files sorted by path put whole classes at the end: `train[90%:]` would hold only the last
    class folders and validation would score classes never trained on. A folder of same-size
    images is read at that size, as its TFDS counterpart is (no resize for the cache)."""
    from job import image_folder

    rng = np.random.default_rng(0)
    for c in range(5):
        for i in range(20):
            _write(tmp_path / "train" / f"class{c}" / f"{i:03d}.png", rng.integers(0, 255, (32, 32, 3), np.uint8),
                   "PNG", "RGB")
    folder = image_folder.scan(str(tmp_path))
    for split in ("train[90%:]", "train[:10%]"):
        assert {label for _, label in image_folder.split_files(folder, split)} == set(range(5)), split
    assert folder.shape == (32, 32, 3)
    config = load_config(None, [f"data.image_dir={tmp_path}", "data.name=five", "model.image_size=32"])
    info = data_lib.dataset_info(config.data, ["train[:90%]"])
    assert info.image_shape == (32, 32, 3) and data_lib.cache_size(config.data, info.image_shape, 32) is None
    image, _ = next(iter(data_lib.load_images(config.data, "train[:90%]", image_size=32)))
    assert image.shape == (32, 32, 3)


def test_a_folder_cache_file_changes_name_when_the_split_changes(tmp_path):
    """A file cache is read back whatever it holds: adding an image must give a new name."""
    from job import image_folder

    rng = np.random.default_rng(1)
    for c in range(2):
        for i in range(4):
            _write(tmp_path / "train" / f"c{c}" / f"{i}.png", rng.integers(0, 255, (8, 8, 3), np.uint8), "PNG", "RGB")
    before = image_folder.fingerprint(str(tmp_path), "train")
    _write(tmp_path / "train" / "c1" / "9.png", rng.integers(0, 255, (8, 8, 3), np.uint8), "PNG", "RGB")
    image_folder.scan.cache_clear()
    assert image_folder.fingerprint(str(tmp_path), "train") != before
