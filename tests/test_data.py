"""Input pipeline ops, eagerly and inside tf.data, on mock TFDS data."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from job import data as data_lib
from job.config import load_config
from job.errors import DataError
from job.preprocess import to_model_input


def _images(n=4, size=8):
    return tf.constant(np.arange(n * size * size * 3).reshape(n, size, size, 3) % 256, tf.uint8)


@pytest.mark.parametrize("mode", ["none", "flip", "flip_crop"])
def test_augment_keeps_shape_dtype_and_is_seeded(mode):
    images = _images()
    seed = tf.constant([1, 2], tf.int64)
    out = data_lib.augment(images, mode, seed)
    assert out.shape == images.shape and out.dtype == tf.uint8
    np.testing.assert_array_equal(out, data_lib.augment(images, mode, seed))


def test_flip_only_mirrors_rows():
    images = _images(n=64)
    out = data_lib.augment(images, "flip", tf.constant([3, 4], tf.int64)).numpy()
    flipped = [not np.array_equal(o, i) for o, i in zip(out, images.numpy())]
    assert 0 < sum(flipped) < 64  # some flipped, some not
    for o, i, f in zip(out, images.numpy(), flipped):
        np.testing.assert_array_equal(o, i[:, ::-1] if f else i)


def test_augment_in_dataset_map_matches_eager():
    images = _images(n=8)
    seed = tf.constant([7, 0], tf.int64)
    eager = data_lib.augment(images, "flip_crop", seed)
    mapped = next(iter(tf.data.Dataset.from_tensors(images).map(lambda x: data_lib.augment(x, "flip_crop", seed))))
    np.testing.assert_array_equal(eager, mapped)


def test_to_model_input_upscales_and_scales_to_unit_range():
    images = tf.constant([[[[0, 127, 255]] * 32] * 32], tf.uint8)
    out = to_model_input(images, 96)
    assert out.shape == (1, 96, 96, 3) and out.dtype == tf.float32
    np.testing.assert_allclose(out[0, 50, 50].numpy(), [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)
    assert to_model_input(images, 96, tf.bfloat16).dtype == tf.bfloat16


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "lanczos3", "lanczos5", "nearest", "area"])
def test_upscaling_by_matrices_equals_resize_then_unsharp_mask(method):
    """The per-axis matrices must compute what tf.image.resize and a SAME box blur compute,
    for known and unknown (serving) image sizes, up- and downscaling."""
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 20, 27, 3)), tf.uint8)
    serving = tf.function(lambda x: to_model_input(x, 48, method=method, sharpen_amount=2.0),
                          input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    for size in (48, 16):
        up = tf.image.resize(tf.cast(images, tf.float32), (size, size), method=method)
        sharpened = up + 2.0 * (up - tf.nn.avg_pool2d(up, 5, 1, "SAME"))
        expected = tf.clip_by_value(sharpened, 0.0, 255.0) / 127.5 - 1.0
        out = to_model_input(images, size, method=method, sharpen_amount=2.0)
        np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(serving(images), to_model_input(images, 48, method=method, sharpen_amount=2.0), atol=1e-5)
    # An image already at the model's size passes unchanged, known size or not.
    native = tf.constant(np.random.default_rng(1).integers(0, 256, (1, 48, 48, 3)), tf.uint8)
    np.testing.assert_allclose(serving(native), tf.cast(native, tf.float32) / 127.5 - 1.0, atol=1e-5)


@pytest.fixture
def mock_cifar():
    with tfds.testing.mock_data(num_examples=48):
        yield load_config(None, ["data.data_dir=/nonexistent/tfds", "data.shuffle_buffer=64"]).data


def test_train_batches_are_uint8_for_device_resize_and_float_for_host(mock_cifar):
    images, labels = next(iter(data_lib.train_dataset(mock_cifar, "train", 8, 64, seed=0)))
    assert images.shape == (8, 32, 32, 3) and images.dtype == tf.uint8 and labels.dtype == tf.int32
    host = mock_cifar.model_copy(update={"resize_on": "host"})
    images, _ = next(iter(data_lib.train_dataset(host, "train", 8, 64, seed=0)))
    assert images.shape == (8, 64, 64, 3) and images.dtype == tf.float32


def test_skipping_batches_resumes_the_same_stream(mock_cifar):
    """A resumed run (skip_batches=k) sees exactly the batches an uninterrupted run sees after k."""
    full = [b[0].numpy() for b in data_lib.train_dataset(mock_cifar, "train", 8, 32, seed=5).take(10)]
    resumed = [b[0].numpy() for b in data_lib.train_dataset(mock_cifar, "train", 8, 32, seed=5, skip_batches=7).take(3)]
    for a, b in zip(full[7:], resumed):
        np.testing.assert_array_equal(a, b)


def test_a_subset_is_the_splits_first_examples_however_it_is_sharded(mock_cifar):
    def labels_of(pipeline, first, pipelines=1):
        context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline)
        return [int(y) for _, y in data_lib.load_images(mock_cifar, "train", context, first=first)]

    full = labels_of(0, None)
    assert labels_of(0, 11) == full[:11]
    assert sorted(labels_of(0, 11, 2) + labels_of(1, 11, 2)) == sorted(full[:11])
    assert (len(labels_of(0, 11, 2)), len(labels_of(1, 11, 2))) == (6, 5)


def test_each_input_pipeline_gets_a_disjoint_shard(mock_cifar):
    def labels_of(pipeline):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2)
        return [int(y) for y in data_lib.eval_dataset(mock_cifar, "train", 48, 32, context).unbatch().map(lambda x, y: y)]

    everything = [int(y) for _, y in data_lib.load_images(mock_cifar, "train")]
    assert labels_of(0) == everything[0::2] and labels_of(1) == everything[1::2]


def test_missing_dataset_without_download_is_a_one_line_error(tmp_path):
    config = load_config(None, [f"data.data_dir={tmp_path}", "data.download=false"]).data
    with pytest.raises(DataError, match="not prepared .* data.download=false"):
        data_lib.dataset_info(config, ["train"])


@pytest.mark.real_data
def test_file_cache_keeps_each_split_and_shard_apart(real_env, tmp_path):
    """tf.data reads an existing cache file whatever its input: one file per split and shard,
    or validation would silently score training images."""
    in_memory = load_config(None, [f"data.data_dir={real_env['TFDS_DATA_DIR']}"]).data
    on_disk = in_memory.model_copy(update={"cache": str(tmp_path / "cache")})

    def labels(config, split, pipeline=None):
        context = pipeline and tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        return [int(y) for _, y in data_lib.load_images(config, split, context)]

    train = labels(on_disk, "train[:64]")  # written first
    assert labels(on_disk, "train[64:128]") == labels(in_memory, "train[64:128]") != train
    assert labels(on_disk, "train[:64]", 1) == labels(in_memory, "train[:64]", 1) == train[1::2]
    assert labels(on_disk, "train[:64]") == train  # read back from its own file
    assert len(list((tmp_path / "cache").glob("*.index"))) == 3
