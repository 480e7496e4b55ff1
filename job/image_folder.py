"""A folder of the user's own images as a dataset (data.image_dir).

Layout, as TFDS's ImageFolder reads it: PATH/<split>/<class>/<image>, e.g. PATH/train/cat/1.jpg.
Splits may be sliced like TFDS splits (`train[:90%]`, `train[90%:]`): the files of a split,
in a fixed order that mixes the classes (by a hash of each file's path under the folder), are
cut by the same rules, so `train[90%:]` holds every class and not the last class folders. JPEG, PNG, GIF (first frame) and BMP, in any
mode (RGB, grayscale, with alpha, palette): each becomes 3-channel RGB. Start-up lists the files
and reads each one's header (its size), never its pixels: files whose header does not read are
left out, counted, and named in the log; a file that fails to decode later is skipped by the
pipeline rather than failing an epoch halfway. A folder of many files (LARGE_FOLDER) gets a log
line pointing at `python -m job prepare`, which writes sharded record files that start in
seconds at any size and are read file by file across workers.
Classes are the sorted folder names of all splits, so a class's index is the same in every split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import types
from typing import Optional

import tensorflow_datasets as tfds

from job.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
# Above this many files, start-up (a header read per file) and per-file reads cost more than
# record shards: the log says so.
LARGE_FOLDER = 20_000


@dataclasses.dataclass(frozen=True)
class Folder:
    root: str
    classes: tuple  # sorted class names
    files: dict  # split -> [(path, class index)], in mixed order (see _mixed_order)
    unreadable: tuple  # paths that do not decode
    shape: tuple = (None, None, 3)  # (height, width, 3) when every image has that size, as decoded


def _split_dirs(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _header_size(path: str) -> Optional[tuple]:
    """(width, height) from an image file's header (its pixels are not decoded), else None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any failure to read the header means "skip it"
        return None


def _mixed_order(root: str, pairs: list) -> list:
    """Sorted by a hash of the path under `root`: the classes interleave, so any slice of a split
    holds every class; the order does not depend on the listing order or on where the folder is."""
    return sorted(pairs, key=lambda pair: hashlib.sha1(os.path.relpath(pair[0], root).encode()).hexdigest())


@functools.lru_cache(maxsize=8)
def scan(root: str, validate: bool = True) -> Folder:
    """The images under `root` (each one's header read, if `validate`); DataError if the
    layout is not PATH/<split>/<class>/<image> with at least two classes."""
    setting = f"data.image_dir={root!r}"
    if not os.path.isdir(root):
        raise DataError(f"{setting}: not a directory")
    splits = _split_dirs(root)
    classes = sorted({c for s in splits for c in _split_dirs(os.path.join(root, s))})
    if not classes:
        raise DataError(f"{setting}: no images; expected {root}/<split>/<class>/<image>, e.g. {root}/train/cat/1.jpg")
    if len(classes) < 2:
        raise DataError(f"{setting}: one class ({classes[0]}); a classifier needs at least two class folders")
    index = {name: i for i, name in enumerate(classes)}
    files, unreadable, sizes = {}, [], set()
    for split in splits:
        found = []
        for name in _split_dirs(os.path.join(root, split)):
            folder = os.path.join(root, split, name)
            for file in sorted(os.listdir(folder)):
                path = os.path.join(folder, file)
                if file.lower().endswith(SUFFIXES) and os.path.isfile(path):
                    size = _header_size(path) if validate else None
                    if validate and size is None:
                        unreadable.append(path)
                        continue
                    sizes.add(size)
                    found.append((path, index[name]))
        files[split] = _mixed_order(root, found)
    if validate and unreadable:
        log.warning("data.image_dir: %d file(s) do not decode and are left out: %s", len(unreadable), ", ".join(unreadable))
    total = sum(len(found) for found in files.values())
    if total > LARGE_FOLDER:
        log.info("data.image_dir: %d images, each read as its own file; for a folder this size `python -m job prepare "
                 "%s DATA_DIR --name NAME` writes sharded records (start-up in seconds, one read per worker's own "
                 "files), then train with data.name=NAME data.data_dir=DATA_DIR", total, root)
    if not any(files.values()):
        raise DataError(f"{setting}: no {'/'.join(SUFFIXES)} images under {root}/<split>/<class>/")
    # One size for every image (CIFAR-10 exported as PNG files, say): cached and augmented at
    # that size like the TFDS set; otherwise resized once for the cache (job.data.cache_size).
    shape = (None, None, 3)
    if validate and len(sizes) == 1:
        width, height = next(iter(sizes))
        shape = (height, width, 3)
    return Folder(root, tuple(classes), files, tuple(unreadable), shape)


def split_files(folder: Folder, split: str) -> list[tuple[str, int]]:
    """The (path, label) pairs of a possibly sliced split, e.g. 'train[:90%]'."""
    try:
        instruction = tfds.core.ReadInstruction.from_spec(split)
        sizes = {name: types.SimpleNamespace(num_examples=len(files)) for name, files in folder.files.items()}
        pieces = instruction.to_absolute(sizes)
    except (ValueError, KeyError, AssertionError) as err:
        available = sorted(folder.files)
        raise DataError(f"split {split!r} of data.image_dir={folder.root!r}: {str(err).splitlines()[0]} "
                        f"(available: {available})") from None
    chosen = [pair for piece in pieces for pair in folder.files[piece.splitname][piece.from_:piece.to]]
    if not chosen:
        raise DataError(f"split {split!r} of data.image_dir={folder.root!r} holds no images")
    return chosen


def info(root: str, splits: list[str], validate: bool = True) -> tuple[tuple, dict, tuple, dict]:
    """(class names, {split: size}, image shape, {split: bytes of its files}) of the folder; the
    shape has None for a size that varies (or is unknown without `validate`)."""
    folder = scan(root, validate)
    chosen = {split: split_files(folder, split) for split in splits}
    return (folder.classes, {split: len(pairs) for split, pairs in chosen.items()}, folder.shape,
            {split: sum(os.path.getsize(path) for path, _ in pairs) for split, pairs in chosen.items()})


def fingerprint(root: str, split: str) -> str:
    """What a split of the folder holds, in its order: part of a file cache's name, so that a
    cache written before files were added, removed or reordered is not read back."""
    paths = "\n".join(os.path.relpath(path, root) for path, _ in split_files(scan(root), split))
    return hashlib.sha1(paths.encode()).hexdigest()[:10]


def encoded_dataset(root: str, split: str, input_context: Optional[object] = None, first: Optional[int] = None):
    """(encoded file bytes, int32 label) pairs of this worker's share of `split` (of its `first` files)."""
    import tensorflow as tf

    pairs = split_files(scan(root), split)[:first]
    ds = tf.data.Dataset.from_tensor_slices(([p for p, _ in pairs], [label for _, label in pairs]))
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds.map(lambda path, label: (tf.io.read_file(path), tf.cast(label, tf.int32)),
                  num_parallel_calls=tf.data.AUTOTUNE)
