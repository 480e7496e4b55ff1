"""Decoding a JPEG only inside its crop window against decoding it whole, on a prepared dataset.

    python benchmarks/decode_crop.py DATA_DIR NAME [--size 224] [--images 2000] [--repeats 3]

Both paths take the same random resized crops (job.data.crop_window with the same seeds) and
resize once to --size; they differ only in `decode_and_crop_jpeg` against `decode_jpeg` and a
slice. One thread each (a per-core rate), alternated, the median of repeats; the encoded records
are read into memory first so that only decoding is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import tensorflow as tf
import tensorflow_datasets as tfds

from job import data as data_lib


def _whole_then_crop(encoded, size, seed):
    image = tf.io.decode_jpeg(encoded, channels=3)
    top, left, height, width = tf.unstack(data_lib.crop_window(tf.shape(image), seed))
    crop = image[top:top + height, left:left + width]
    return tf.cast(tf.clip_by_value(tf.round(tf.image.resize(crop, (size, size), antialias=True)), 0, 255), tf.uint8)


def _rate(encoded: tf.data.Dataset, decode, size: int, count: int) -> float:
    ds = tf.data.Dataset.zip((encoded, tf.data.Dataset.counter()))
    ds = ds.map(lambda image, i: decode(image, size, tf.stack([tf.constant(1, tf.int64), i])))
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
    ds = ds.with_options(options)
    started = time.perf_counter()
    for _ in ds:
        pass
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("name")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    builder = tfds.builder(args.name, data_dir=args.data_dir)
    ds = builder.as_dataset(split=f"train[:{args.images}]", decoders={"image": tfds.decode.SkipDecoding()})
    encoded = tf.data.Dataset.from_tensor_slices([ex["image"] for ex in ds])  # in memory: time decoding only
    fused = lambda image, size, seed: data_lib.decode_crop_resize(image, size, "bilinear", seed)  # noqa: E731
    rates = {"fused": [], "whole": []}
    for _ in range(args.repeats):
        rates["fused"].append(_rate(encoded, fused, args.size, args.images))
        rates["whole"].append(_rate(encoded, _whole_then_crop, args.size, args.images))
    result = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    print(json.dumps({"images": args.images, "size": args.size, "images_per_sec_one_thread": result,
                      "repeats": rates, "fused_over_whole": round(result["fused"] / result["whole"], 2)}))


if __name__ == "__main__":
    main()
