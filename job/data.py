"""The input pipeline: a split of a dataset source (job.sources) as batches for a strategy.

Two ways through, chosen per run by what fits in memory (job.caches resolves data.cache=auto):
  - decoded cache (small sets, like CIFAR-10's 150 MB): this pipeline's examples -> decode ->
    (resize once to cache_size, for large images) -> cache uint8 -> seeded shuffle -> repeat
    -> batch -> augment -> (resize to the model input) -> prefetch;
  - streaming (sets whose decoded images do not fit): this pipeline's record files, in a seeded
    order drawn anew each pass, interleaved (job.shards) -> (the encoded bytes cached, with
    data.cache=raw) -> shuffle buffer bounded in bytes -> repeat -> per image, the JPEG decoded
    only inside its crop window (`decode_and_crop_jpeg`) and resized once to the model input
    -> batch -> flips -> prefetch.
Every random choice is seeded by the example's or batch's index, so a resumed run skips
exactly the examples it had already seen and sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from typing import Optional

from etils import epy

from job import sources
from job.config import DataConfig
from job.preprocess import model_input_fn
from job.sources import DatasetInfo

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


def dataset_info(data: DataConfig, splits: list[str], prepare: bool = True) -> Optional[DatasetInfo]:
    """Number of classes (and their names), image shape, size and stored bytes of each requested split.

    prepare=False never downloads (nor loads TensorFlow for a prepared dataset): it returns None
    when the dataset still has to be downloaded, so the check is left to the real run.
    """
    source = sources.open_source(data, prepare)
    return None if source is None else source.info(splits)


def shard_count(data: DataConfig, split: str, first: Optional[int], input_context=None) -> int:
    """How many of `split`'s (`first`) examples one input pipeline reads."""
    return sources.open_source(data).shard_count(split, first, input_context)


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


def cache_file(data: DataConfig, fingerprint: str, split: str, size: Optional[int], input_context=None,
               first: Optional[int] = None) -> str:
    """The on-disk cache of one dataset, split, shard and preprocessing under data.cache.

    tf.data reads an existing cache file whatever pipeline it now sits in, so the name must
    say everything that decides its content, or validation silently scores training images.
    """
    pipelines = input_context.num_input_pipelines if input_context else 1
    shard = f"shard{input_context.input_pipeline_id}of{pipelines}" if pipelines > 1 else "all"
    form = f"uint8-{size}px" if size else "uint8-native"
    what = f"{data.name}-{split}{'' if first is None else f'-first{first}'}-{shard}-{form}"
    digest = hashlib.sha256(f"{fingerprint}|{what}".encode()).hexdigest()[:10]
    return os.path.join(data.cache, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', what)}-{digest}")


def streams(data: DataConfig) -> bool:
    """Whether images are decoded as they are read (data.cache raw or none), not cached decoded."""
    return data.cache in ("raw", "none", "auto")


def decode_full(image, shape: tuple):
    """An encoded image (any format, any mode) -> uint8 RGB; a decoded one passes. Files of
    another size than a folder's one size fail here and are skipped (ignore_errors)."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    image = tf.ensure_shape(image, (*shape[:2], None))
    return image


def load_images(data: DataConfig, split: str, input_context: Optional[tf.distribute.InputContext] = None,
                image_size: Optional[int] = None, first: Optional[int] = None):
    """(uint8 image, int32 label) pairs of this worker's shard of `split` (of its `first` examples
    only, if given), decoded and cached: at their own size, or resized once to `cache_size`
    (images larger than the model input or of varying size)."""
    source = sources.open_source(data)
    shape = source.info([]).image_shape
    ds = source.examples(split, input_context, first)
    size = cache_size(data, shape, image_size) if image_size else None
    ds = ds.map(lambda image, label: (decode_full(image, shape), label), num_parallel_calls=AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)  # a file that does not decode is left out, not the epoch
    if size:
        ds = ds.map(lambda image, label: (_resize_for_cache(image, size), label), num_parallel_calls=AUTOTUNE)
    if data.cache == "memory":
        ds = ds.cache()
    elif not streams(data):
        os.makedirs(data.cache, exist_ok=True)
        ds = ds.cache(cache_file(data, source.fingerprint(split), split, size, input_context, first))
    return ds


def crop_window(shape, seed: Optional[tf.Tensor], area=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    """[top, left, height, width] inside an image of `shape` (h, w, c): its centre square, or with
    a seed a random crop of `area` of that square at an aspect ratio in `ratio` (log-uniform),
    as `random_resized_crop` takes them from a cached square."""
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    side = tf.minimum(height, width)
    top, left, crop_h, crop_w = (height - side) / 2, (width - side) / 2, side, side
    if seed is not None:
        area_seed, ratio_seed, place_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        scale = tf.random.stateless_uniform([], area_seed, *area)
        aspect = tf.exp(tf.random.stateless_uniform([], ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
        crop_h = side * tf.minimum(tf.sqrt(scale / aspect), 1.0)
        crop_w = side * tf.minimum(tf.sqrt(scale * aspect), 1.0)
        place = tf.random.stateless_uniform([2], place_seed)
        top, left = top + place[0] * (side - crop_h), left + place[1] * (side - crop_w)
    window = tf.cast(tf.round(tf.stack([top, left, crop_h, crop_w])), tf.int32)
    return tf.maximum(window, [0, 0, 1, 1])


def decode_crop_resize(encoded, image_size: int, method: str, seed: Optional[tf.Tensor] = None):
    """An encoded image -> its crop window (`crop_window`) resized once to `image_size`, uint8 RGB.

    A JPEG is decoded only inside the window (`decode_and_crop_jpeg`: the rows above and the
    blocks outside are skipped), other formats whole and then cropped."""
    def jpeg():
        window = crop_window(tf.image.extract_jpeg_shape(encoded), seed)
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        top, left, height, width = tf.unstack(crop_window(tf.shape(image), seed))
        return image[top:top + height, left:left + width]

    crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    resized = tf.image.resize(crop, (image_size, image_size), method=method, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _stream_decoder(data: DataConfig, info: DatasetInfo, image_size: int, random_crops: bool, seed: int):
    """(image, label, example index) -> (uint8 image ready to batch, label): small images of one
    size at their own size (the step upscales them), others cropped and resized once."""
    def decode(image, label, index):
        if source_images_are_small(info.image_shape, image_size):
            return decode_full(image, info.image_shape), label
        crop_seed = tf.stack([tf.cast(seed, tf.int64), index]) if random_crops else None
        if image.dtype != tf.string:  # stored decoded: crop the tensor
            image = tf.io.encode_png(image)
        return decode_crop_resize(image, image_size, data.resize_method, crop_seed), label
    return decode


def shuffle_buffer(data: DataConfig, info: DatasetInfo, split: str) -> int:
    """data.shuffle_buffer examples, fewer if their stored bytes would exceed data.shuffle_buffer_mb."""
    count, stored = info.split_sizes.get(split), info.split_bytes.get(split)
    if not count or not stored:
        return data.shuffle_buffer
    return max(1, min(data.shuffle_buffer, int(data.shuffle_buffer_mb * 2**20 / (stored / count))))


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

    With data.resize_on == "device" small images stay uint8 at native size; the train step
    resizes them. `skip_batches` fast-forwards a resumed run past seen batches.
    `augment_mode` overrides data.augment (phases may augment differently); `first` limits
    the split to its first examples (a phase's subset).
    """
    info = dataset_info(data, [split])
    augment_mode = resolve_augment(augment_mode or data.augment, info.image_shape, image_size)
    if streams(data):
        ds = _streamed_examples(data, info, split, image_size, seed, skip_batches * batch_size, input_context,
                                augment_mode == "resized_crop", first)
        batch_augment = "flip" if augment_mode == "resized_crop" else augment_mode  # its crops are done
    else:
        ds = load_images(data, split, input_context, image_size, first)
        ds = ds.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        batch_augment = augment_mode
    ds = ds.batch(batch_size, drop_remainder=True)
    if skip_batches and not streams(data):
        ds = ds.skip(skip_batches)
    # One stateless seed per batch, derived from the batch's index: reproducible across resumes.
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter(start=skip_batches)))

    def prepare(batch, index):
        images, labels = batch
        images = augment(images, batch_augment, tf.stack([tf.cast(seed, tf.int64), index]))
        if data.resize_on == "host":
            images = model_input_fn(data, image_size)(images)
        return images, labels

    return pipeline_options(ds.map(prepare, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE))


def _streamed_examples(data, info, split, image_size, seed, skip_examples, input_context, random_crops, first):
    """Decoded, cropped examples of an endless seeded stream of this pipeline's records.

    Skipped examples of a resumed run are read but not decoded."""
    source = sources.open_source(data)
    if data.cache == "raw":  # the encoded bytes in memory: files in order, the buffer mixes them
        ds = source.examples(split, input_context, first).cache()
    else:
        ds = source.examples(split, input_context, first, shuffle_seed=seed)
    ds = ds.shuffle(shuffle_buffer(data, info, split), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.skip(skip_examples)
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter(start=skip_examples)))
    decode = _stream_decoder(data, info, image_size, random_crops, seed)
    ds = ds.map(lambda example, index: decode(*example, index), num_parallel_calls=AUTOTUNE)
    return ds.ignore_errors(log_warning=True)


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
    if streams(data):
        info = dataset_info(data, [split])
        ds = sources.open_source(data).examples(split, input_context, first)
        if data.cache == "raw":
            ds = ds.cache()
        decode = _stream_decoder(data, info, image_size, False, 0)
        ds = ds.map(lambda image, label: decode(image, label, tf.constant(0, tf.int64)), num_parallel_calls=AUTOTUNE)
        ds = ds.ignore_errors(log_warning=True)
    else:
        ds = load_images(data, split, input_context, image_size, first)
    ds = ds.batch(batch_size)
    if data.resize_on == "host":
        prepare = model_input_fn(data, image_size)
        ds = ds.map(lambda images, labels: (prepare(images), labels), num_parallel_calls=AUTOTUNE)
    return pipeline_options(ds.prefetch(AUTOTUNE))
