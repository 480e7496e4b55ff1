"""The input pipeline: a TFDS image-classification split as batches for a strategy.

Order of operations, and why:
  TFDS -> shard by data (the prepared cifar10 has one file, so file sharding cannot split it)
  -> cache the small decoded uint8 images (150 MB for CIFAR-10; after resizing to 224 px
  as float32 it would be 30 GB) -> seeded shuffle -> repeat -> batch -> augment at 32x32
  -> optional resize + scale to the model's input -> prefetch.
The shuffle is seeded and reshuffles each epoch deterministically, so a resumed run skips
exactly the examples it had already seen and sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from typing import Optional

import tensorflow_datasets as tfds
from etils import epy

from job import image_folder, storage
from job.config import DataConfig
from job.errors import DataError, JobError
from job.preprocess import model_input_fn

with epy.lazy_imports():
    # TensorFlow loads on first use: `dataset_info` reads TFDS metadata alone, so the CLI
    # checks data settings in a second, before TensorFlow's slow start-up.
    import tensorflow as tf

AUTOTUNE = -1  # tf.data.AUTOTUNE, spelled out so that importing this module stays light


# tf.data's own thread pool size for every pipeline; None: one thread per core of the host.
# job.distribute.configure_threads sets it to the process's CPU share.
_PIPELINE_THREADS: Optional[int] = None


def set_pipeline_threads(threads: Optional[int]) -> None:
    global _PIPELINE_THREADS
    _PIPELINE_THREADS = threads


def pipeline_options(ds):
    """`ds` without tf.data's background autotuning model, and with a thread pool of the process's
    CPU share (job.distribute.configure_threads); AUTOTUNE parallelism then means that many threads.

    In TensorFlow 2.21 deleting an iterator whose model thread runs waits for that thread's
    next scheduled wake-up, which backs off to a minute: measured 32 s after 50 s of
    iteration and 42 s after 100 s (0 s without the model), at the end of every phase.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    if _PIPELINE_THREADS:
        options.threading.private_threadpool_size = _PIPELINE_THREADS
    return ds.with_options(options)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple
    split_sizes: dict
    class_names: tuple = ()


def _data_dir(data: DataConfig, metadata_only: bool) -> Optional[str]:
    """data.data_dir as a local TFDS data_dir: a URI's dataset is mirrored into this node's cache once."""
    if not data.data_dir or not storage.is_uri(data.data_dir):
        return data.data_dir
    local = storage.node_cache("tfds", hashlib.sha256(data.data_dir.encode()).hexdigest()[:12])
    try:
        found = storage.fetch_tree(storage.join(data.data_dir, data.name), os.path.join(local, data.name), metadata_only)
    except (OSError, JobError) as err:
        raise DataError(f"data.data_dir={data.data_dir!r}: cannot read it ({str(err).splitlines()[0][:160]})") from None
    if not found:
        raise DataError(f"data.data_dir={data.data_dir!r} holds no {data.name}/ folder: a TFDS data_dir holds "
                        "<name>/<version>/ folders")
    return local


def _builder(data: DataConfig, prepare: bool = True):
    """The TFDS builder, prepared (downloaded) if allowed; None if `prepare` is off and it needs preparing."""
    if data.data_dir and os.path.exists(data.data_dir) and not os.path.isdir(data.data_dir):
        raise DataError(f"data.data_dir={data.data_dir!r}: not a directory; a TFDS data_dir holds <name>/<version>/ folders")
    data_dir = _data_dir(data, metadata_only=not prepare)
    try:
        builder = tfds.builder(data.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"data.name={data.name!r}: no such TFDS dataset (see tfds.list_builders())") from None
    if not builder.is_prepared():
        where = builder.data_dir
        if not data.download:
            # A common slip: data_dir pointing at the dataset's own folder rather than its parent.
            hint = (f" (data.data_dir ends in {data.name!r}: use its parent)"
                    if data.data_dir and os.path.basename(os.path.normpath(data.data_dir)) == data.name else "")
            raise DataError(
                f"data.name={data.name!r} is not prepared in {where}{hint} and data.download=false: "
                "set data.data_dir (or TFDS_DATA_DIR) to a TFDS data_dir that holds it, or allow downloading"
            )
        if not prepare:
            return None
        builder = _download_once(data, builder)
    return builder


def _download_once(data: DataConfig, builder):
    """Download and prepare under a file lock in the data_dir: processes on one node (or on a
    shared data_dir) wait for the first instead of writing the same files."""
    from filelock import FileLock

    root = os.path.dirname(os.path.dirname(builder.data_dir))  # <root>/<name>/<version>
    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, f".{data.name}.prepare.lock")):
        builder = tfds.builder(data.name, data_dir=root)
        if builder.is_prepared():
            return builder
        try:
            builder.download_and_prepare()
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise DataError(
                f"data.name={data.name!r}: download failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                "prepare it elsewhere and point data.data_dir (or TFDS_DATA_DIR) at that data_dir"
            ) from None
    return builder


def _keys(builder) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2:
        raise DataError(f"data.name={builder.name!r} has no (image, label) supervised keys")
    return keys


def dataset_info(data: DataConfig, splits: list[str], prepare: bool = True) -> Optional[DatasetInfo]:
    """Number of classes (and their names), image shape and the size of each requested split.

    prepare=False never downloads (nor loads TensorFlow for a prepared dataset) nor decodes an
    image folder's files: it returns None when the dataset still has to be downloaded, so the
    check is left to the real run.
    """
    if data.image_dir:
        names, sizes, shape = image_folder.info(data.image_dir, splits, validate=prepare)
        return DatasetInfo(len(names), shape, sizes, names)
    builder = _builder(data, prepare)
    if builder is None:
        return None
    image_key, label_key = _keys(builder)
    features = builder.info.features
    if not hasattr(features[label_key], "num_classes"):
        raise DataError(f"data.name={data.name!r}: label '{label_key}' is not a class label")
    sizes = {}
    for split in splits:
        try:
            if not builder.info.splits:
                # No split metadata (e.g. under tfds.testing.mock_data): count by reading.
                sizes[split] = int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))
                continue
            sizes[split] = builder.info.splits[split].num_examples
        except (ValueError, KeyError) as err:
            available = list(builder.info.splits.keys())
            raise DataError(f"split {split!r} of {data.name!r}: {str(err).splitlines()[0]} (available: {available})") from None
    label = features[label_key]
    return DatasetInfo(label.num_classes, tuple(features[image_key].shape), sizes, tuple(label.names))


def cache_size(data: DataConfig, image_shape: tuple, image_size: int) -> Optional[int]:
    """The square size images are resized to before caching, or None: cached at their own size
    (all of one size, no larger than the model input, like CIFAR-10's 32x32)."""
    if data.cache_image_size:
        return data.cache_image_size
    height, width = image_shape[:2]
    if height and width and max(height, width) <= image_size:
        return None
    return math.ceil(image_size * 8 / 7)


def cache_bytes(count: int, image_shape: tuple, size: Optional[int]) -> int:
    """Memory of `count` cached images: uint8, at `size` (or their own size) and their own channels."""
    height, width = (size, size) if size else image_shape[:2]
    return count * height * width * (image_shape[2] or 3)


def source_images_are_small(image_shape: tuple, image_size: int) -> bool:
    height, width = image_shape[:2]
    return bool(height and width and max(height, width) <= image_size)


def resolve_augment(mode: str, image_shape: tuple, image_size: int) -> str:
    """"auto": flips for images no larger than the model input (CIFAR-10), random resized crops
    and flips for larger ones; any other mode as it is."""
    if mode != "auto":
        return mode
    return "flip" if source_images_are_small(image_shape, image_size) else "resized_crop"


def _resize_for_cache(image, size: int):
    """Shorter side to `size`, then the centre `size` x `size` square, uint8."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    resized = tf.image.resize(image, tf.cast(tf.math.ceil(shape * scale), tf.int32), antialias=True)
    square = tf.image.resize_with_crop_or_pad(resized, size, size)
    return tf.cast(tf.clip_by_value(tf.round(square), 0, 255), tf.uint8)


def shard_count(count: int, input_context: Optional[tf.distribute.InputContext] = None) -> int:
    """How many of a split's first `count` examples one input pipeline reads: shards deal them round-robin."""
    pipelines = input_context.num_input_pipelines if input_context else 1
    index = input_context.input_pipeline_id if input_context else 0
    return max(count - index + pipelines - 1, 0) // pipelines


def cache_file(data: DataConfig, source: str, version: str, split: str, size: Optional[int], input_context=None,
               first: Optional[int] = None) -> str:
    """The on-disk cache of one dataset, split, shard and preprocessing under data.cache.

    tf.data reads an existing cache file whatever pipeline it now sits in, so the name must
    say everything that decides its content, or validation silently scores training images.
    """
    pipelines = input_context.num_input_pipelines if input_context else 1
    shard = f"shard{input_context.input_pipeline_id}of{pipelines}" if pipelines > 1 else "all"
    form = f"uint8-{size}px" if size else "uint8-native"
    what = f"{data.name}-{version}-{split}{'' if first is None else f'-first{first}'}-{shard}-{form}"
    digest = hashlib.sha256(f"{source}|{what}".encode()).hexdigest()[:10]
    return os.path.join(data.cache, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', what)}-{digest}")


def load_images(data: DataConfig, split: str, input_context: Optional[tf.distribute.InputContext] = None,
                image_size: Optional[int] = None, first: Optional[int] = None):
    """(uint8 image, int32 label) pairs of this worker's shard of `split` (of its `first` examples
    only, if given), cached: at their own size, or resized once to `cache_size` (images larger
    than the model input or of varying size)."""
    if data.image_dir:
        ds, source = image_folder.dataset(data.image_dir, split, input_context), data.image_dir
        version = f"folder{image_folder.fingerprint(data.image_dir, split)}"
        shape = image_folder.scan(data.image_dir).shape
    else:
        builder = _builder(data)
        image_key, label_key = _keys(builder)
        ds = builder.as_dataset(split=split, shuffle_files=False)
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)), num_parallel_calls=AUTOTUNE)
        source, version, shape = builder.data_dir, str(builder.version), tuple(builder.info.features[image_key].shape)
    if first is not None:  # before decoding and caching: the rest is never read
        ds = ds.take(shard_count(first, input_context))
    size = cache_size(data, shape, image_size) if image_size else None
    if size:
        ds = ds.map(lambda image, label: (_resize_for_cache(image, size), label), num_parallel_calls=AUTOTUNE)
    if data.cache == "memory":
        ds = ds.cache()
    elif data.cache != "none":
        os.makedirs(data.cache, exist_ok=True)
        ds = ds.cache(cache_file(data, source, version, split, size, input_context, first))
    return ds


def augment(images: tf.Tensor, mode: str, seed: tf.Tensor) -> tf.Tensor:
    """Random flip, with a 4-pixel pad-and-crop ("flip_crop") or a random resized crop
    ("resized_crop"), on a uint8 batch at its cached size.

    Done before upscaling: at 32x32 it costs almost nothing. `seed` is a [2] int tensor,
    so the same seed gives the same augmentation (a resumed run matches an uninterrupted one).
    """
    if mode == "none":
        return images
    shape = tf.shape(images)
    _, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    images = tf.where(flip_mask(shape[0], seed), tf.reverse(images, axis=[2]), images)
    if mode == "flip_crop":
        pad = 4
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        offsets = tf.random.stateless_uniform([shape[0], 2], crop_seed, maxval=2 * pad + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(shape[1])[None, :]
        cols = offsets[:, 1:] + tf.range(shape[2])[None, :]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    elif mode == "resized_crop":
        images = random_resized_crop(images, crop_seed)
    elif mode != "flip":
        raise ValueError(f"augmentation {mode!r}")
    return images


def flip_mask(count, seed):
    """[count, 1, 1, 1] booleans: which images of a batch `augment` mirrors for this [2] seed.
    Cached activations of mirrored images are picked with the same mask (job.train), so a
    phase trained on them sees exactly the flips an image pipeline would apply."""
    flip_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return tf.random.stateless_uniform([count, 1, 1, 1], flip_seed) < 0.5


def random_resized_crop(images: tf.Tensor, seed: tf.Tensor, area=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
    """Per image a crop of `area` of it at an aspect ratio in `ratio` (log-uniform), resized
    back to the batch's size: the usual ImageNet-style augmentation, one op for the batch."""
    count = tf.shape(images)[0]
    area_seed, ratio_seed, place_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    scale = tf.random.stateless_uniform([count], area_seed, *area)
    aspect = tf.exp(tf.random.stateless_uniform([count], ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
    height = tf.minimum(tf.sqrt(scale / aspect), 1.0)
    width = tf.minimum(tf.sqrt(scale * aspect), 1.0)
    place = tf.random.stateless_uniform([count, 2], place_seed)
    top, left = place[:, 0] * (1.0 - height), place[:, 1] * (1.0 - width)
    boxes = tf.stack([top, left, top + height, left + width], axis=1)
    size = tf.shape(images)[1:3]
    crops = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(count), size)
    return tf.cast(tf.clip_by_value(tf.round(crops), 0, 255), images.dtype)


def train_dataset(
    data: DataConfig,
    split: str,
    batch_size: int,
    image_size: int,
    seed: int,
    skip_batches: int = 0,
    input_context: Optional[tf.distribute.InputContext] = None,
    augment_mode: Optional[str] = None,
    first: Optional[int] = None,
):
    """Endless shuffled, augmented batches of `batch_size` for one input pipeline.

    With data.resize_on == "device" the batches stay uint8 at native size; the train
    step resizes them. `skip_batches` fast-forwards a resumed run past seen batches.
    `augment_mode` overrides data.augment (phases may augment differently); `first` limits
    the split to its first examples (a phase's subset).
    """
    augment_mode = augment_mode or data.augment
    if augment_mode == "auto":
        augment_mode = resolve_augment(augment_mode, dataset_info(data, []).image_shape, image_size)
    ds = load_images(data, split, input_context, image_size, first)
    ds = ds.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    if skip_batches:
        ds = ds.skip(skip_batches)
    # One stateless seed per batch, derived from the batch's index: reproducible across resumes.
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter(start=skip_batches)))

    def prepare(batch, index):
        images, labels = batch
        images = augment(images, augment_mode, tf.stack([tf.cast(seed, tf.int64), index]))
        if data.resize_on == "host":
            images = model_input_fn(data, image_size)(images)
        return images, labels

    return pipeline_options(ds.map(prepare, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE))


def eval_dataset(
    data: DataConfig,
    split: str,
    batch_size: int,
    image_size: int,
    input_context: Optional[tf.distribute.InputContext] = None,
    first: Optional[int] = None,
):
    """One ordered pass over `split` (its `first` examples, if given), last batch partial,
    prepared like training batches."""
    ds = load_images(data, split, input_context, image_size, first).batch(batch_size)
    if data.resize_on == "host":
        prepare = model_input_fn(data, image_size)
        ds = ds.map(lambda images, labels: (prepare(images), labels), num_parallel_calls=AUTOTUNE)
    return pipeline_options(ds.prefetch(AUTOTUNE))
