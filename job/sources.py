"""Where examples come from: one interface, chosen once per run (`open_source`).

A source knows a dataset's metadata (classes, image shape, split sizes, bytes on disk) and
hands each input pipeline its share of a split as (image, label) pairs, where the image is
still encoded (JPEG/PNG bytes) whenever the storage holds it encoded, so that job.data can
decode it fused with a crop, or cache it decoded, as memory allows.

- `TfdsSource`: any prepared TFDS dataset, including those `python -m job prepare` writes.
  Its record files are read by job.shards: each pipeline opens only its own files when there
  are at least as many files as pipelines, else every pipeline reads all and keeps its share
  of the records (one warning). A data_dir in a bucket is read in place, file by file.
- `FolderSource`: a local folder of images, PATH/<split>/<class>/<image> (job.image_folder);
  its files are the "records".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Optional

import tensorflow_datasets as tfds
from etils import epy

from job import image_folder, shards, storage
from job.config import DataConfig
from job.errors import DataError, JobError

with epy.lazy_imports():
    import tensorflow as tf

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple
    split_sizes: dict
    class_names: tuple = ()
    # Bytes of a split's stored (encoded) examples, where known: the raw cache's size.
    split_bytes: dict = dataclasses.field(default_factory=dict)


class Source:
    """The interface job.data reads through."""

    name: str
    encoded: bool  # images arrive as encoded bytes (decoded by job.data) rather than uint8 tensors

    def info(self, splits: list[str]) -> DatasetInfo:
        raise NotImplementedError

    def fingerprint(self, split: str) -> str:
        """What a split holds (source, version, files): part of an on-disk cache's name."""
        raise NotImplementedError

    def examples(self, split: str, input_context=None, first: Optional[int] = None,
                 shuffle_seed: Optional[int] = None):
        """This pipeline's (image, int32 label) pairs of `split` (of its `first` examples), in
        storage order, or with the file order reshuffled on every pass when `shuffle_seed` is given."""
        raise NotImplementedError

    def shard_count(self, split: str, first: Optional[int], input_context=None) -> int:
        """How many of the split's (first) examples this pipeline reads."""
        raise NotImplementedError


# --- TFDS --------------------------------------------------------------------------------

def _metadata_dir(data: DataConfig) -> Optional[str]:
    """data.data_dir as a local TFDS data_dir: a bucket's metadata files only are copied to this
    node's cache (the record files are read in place, each pipeline its own)."""
    if not data.data_dir or not storage.is_uri(data.data_dir):
        return data.data_dir
    local = storage.node_cache("tfds", hashlib.sha256(data.data_dir.encode()).hexdigest()[:12])
    try:
        found = storage.fetch_tree(storage.join(data.data_dir, data.name), os.path.join(local, data.name),
                                   metadata_only=True)
    except (OSError, JobError) as err:
        raise DataError(f"data.data_dir={data.data_dir!r}: cannot read it ({str(err).splitlines()[0][:160]})") from None
    if not found:
        raise DataError(f"data.data_dir={data.data_dir!r} holds no {data.name}/ folder: a TFDS data_dir holds "
                        "<name>/<version>/ folders")
    return local


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


def tfds_builder(data: DataConfig, prepare: bool = True):
    """The TFDS builder, prepared (downloaded) if allowed; None if `prepare` is off and it needs preparing."""
    if data.data_dir and not storage.is_uri(data.data_dir) and os.path.exists(data.data_dir) \
            and not os.path.isdir(data.data_dir):
        raise DataError(f"data.data_dir={data.data_dir!r}: not a directory; a TFDS data_dir holds <name>/<version>/ folders")
    data_dir = _metadata_dir(data)
    try:
        builder = tfds.builder(data.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        where = f", and data.data_dir={data.data_dir!r} holds no {data.name}/<version>/ folder" if data.data_dir else ""
        raise DataError(f"data.name={data.name!r}: no such TFDS dataset (see tfds.list_builders()){where}") from None
    if not builder.is_prepared():
        if not data.download or storage.is_uri(data.data_dir or ""):
            # A common slip: data_dir pointing at the dataset's own folder rather than its parent.
            hint = (f" (data.data_dir ends in {data.name!r}: use its parent)"
                    if data.data_dir and os.path.basename(os.path.normpath(data.data_dir)) == data.name else "")
            raise DataError(
                f"data.name={data.name!r} is not prepared in {data.data_dir or builder.data_dir}{hint} and "
                "data.download=false: set data.data_dir (or TFDS_DATA_DIR) to a TFDS data_dir that holds it, "
                "or allow downloading"
            )
        if not prepare:
            return None
        builder = _download_once(data, builder)
    return builder


class TfdsSource(Source):
    def __init__(self, data: DataConfig, builder):
        self.data, self.builder, self.name = data, builder, data.name
        keys = builder.info.supervised_keys
        if not keys or len(keys) != 2:
            raise DataError(f"data.name={data.name!r} has no (image, label) supervised keys")
        self.image_key, self.label_key = keys
        features = builder.info.features
        if not hasattr(features[self.label_key], "num_classes"):
            raise DataError(f"data.name={data.name!r}: label '{self.label_key}' is not a class label")
        self.encoded = isinstance(features[self.image_key], tfds.features.Image)
        # Record files live where data.data_dir says (a bucket is read in place); metadata is local.
        self.files_root = (storage.join(data.data_dir, data.name, str(builder.version))
                           if data.data_dir and storage.is_uri(data.data_dir) else builder.data_dir)

    def info(self, splits: list[str]) -> DatasetInfo:
        features, info = self.builder.info.features, self.builder.info
        sizes, sizes_bytes = {}, {}
        for split in splits:
            try:
                if not info.splits:
                    # No split metadata (e.g. under tfds.testing.mock_data): count by reading.
                    sizes[split] = int(self.builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))
                    continue
                sizes[split] = info.splits[split].num_examples
                sizes_bytes[split] = self._split_bytes(split)
            except (ValueError, KeyError) as err:
                available = list(info.splits.keys())
                raise DataError(f"split {split!r} of {self.name!r}: {str(err).splitlines()[0]} "
                                f"(available: {available})") from None
        label = features[self.label_key]
        return DatasetInfo(label.num_classes, tuple(features[self.image_key].shape), sizes, tuple(label.names),
                           sizes_bytes)

    def _split_bytes(self, split: str) -> int:
        """Stored bytes of a (sliced) split, at the dataset's mean bytes per example."""
        splits = self.builder.info.splits
        per_example = sum(s.num_bytes for s in splits.values()) / max(sum(s.num_examples for s in splits.values()), 1)
        return int(splits[split].num_examples * per_example)

    def fingerprint(self, split: str) -> str:
        return f"{self.name}-{self.builder.version}|{self.builder.data_dir}|{split}"

    def _files(self, split: str, first: Optional[int]) -> list[shards.FileSlice]:
        return shards.file_slices(self.builder.info.splits[split].file_instructions, self.files_root, first)

    def shard_count(self, split: str, first: Optional[int], input_context=None) -> int:
        if not self.builder.info.splits:
            return shards.record_share(first, input_context)
        return shards.plan(self._files(split, first), input_context).count

    def examples(self, split: str, input_context=None, first: Optional[int] = None,
                 shuffle_seed: Optional[int] = None):
        if not self.builder.info.splits:  # mock data: no files to plan, TFDS reads its own way
            ds = self.builder.as_dataset(split=split, shuffle_files=False)
            ds = shards.shard_records(ds, input_context)
            if first is not None:
                ds = ds.take(shards.record_share(first, input_context))
            return ds.map(lambda ex: (ex[self.image_key], tf.cast(ex[self.label_key], tf.int32)))
        decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded else None
        features = self.builder.info.features

        def parse(record):
            example = features.deserialize_example(record, decoders=decoders)
            return example[self.image_key], tf.cast(example[self.label_key], tf.int32)

        records = shards.records(self._files(split, first), input_context, shuffle_seed, f"data.name={self.name!r}")
        return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


# --- a folder of images ------------------------------------------------------------------

class FolderSource(Source):
    encoded = True

    def __init__(self, data: DataConfig):
        self.data, self.root, self.name = data, data.image_dir, data.name
        if storage.is_uri(self.root):
            raise DataError(f"data.image_dir={self.root!r}: a folder in a bucket is read through "
                            f"`python -m job prepare {self.root} DATA_DIR --name NAME`, then data.data_dir=DATA_DIR")

    def folder(self):
        return image_folder.scan(self.root)

    def info(self, splits: list[str]) -> DatasetInfo:
        names, sizes, shape, sizes_bytes = image_folder.info(self.root, splits)
        return DatasetInfo(len(names), shape, sizes, names, sizes_bytes)

    def fingerprint(self, split: str) -> str:
        return f"{self.root}|folder{image_folder.fingerprint(self.root, split)}|{split}"

    def shard_count(self, split: str, first: Optional[int], input_context=None) -> int:
        count = len(image_folder.split_files(self.folder(), split))
        return shards.record_share(count if first is None else min(first, count), input_context)

    def examples(self, split: str, input_context=None, first: Optional[int] = None,
                 shuffle_seed: Optional[int] = None):
        # Files are the records: small folders only, so each pipeline takes every N-th file.
        del shuffle_seed  # the example shuffle buffer spans a small folder's files
        return image_folder.encoded_dataset(self.root, split, input_context, first)


def open_source(data: DataConfig, prepare: bool = True) -> Optional[Source]:
    """The run's source for `data`; None when a TFDS dataset still has to be downloaded and `prepare` is off."""
    return _open(data.model_dump_json(), prepare)


@functools.lru_cache(maxsize=8)
def _open(data_json: str, prepare: bool) -> Optional[Source]:
    # Opened once per process and settings: a bucket's metadata is listed once, not per pipeline.
    data = DataConfig.model_validate_json(data_json)
    if data.image_dir:
        return FolderSource(data)
    builder = tfds_builder(data, prepare)
    return None if builder is None else TfdsSource(data, builder)
