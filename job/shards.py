"""A split's record files, each input pipeline reading only its own.

With at least as many files as input pipelines, pipeline i of N opens files i, i+N, ... (as
`tfds.ReadConfig(input_context=...)` does), so N workers read the dataset's bytes once between
them, not N times. With fewer files every pipeline reads them all and keeps every N-th record
(one warning: the prepared CIFAR-10 of TFDS is a single file). A training pass visits the
files in a seeded order drawn anew on every pass and interleaves several of them; since the
order, the interleave and the shuffle buffer are all seeded, a resumed run that skips the
records already seen is exactly where the interrupted one was.

Files in a bucket (s3://, gs://) are read in place: each pipeline downloads only its own files,
one after another, a bounded few ahead of the reader, into local scratch, and deletes each once
newer ones have replaced it (an open file stays readable after its name is removed).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import weakref
from typing import Optional

from etils import epy

from job import storage

with epy.lazy_imports():
    import tensorflow as tf

log = logging.getLogger(__name__)


def _scratch() -> str:
    folder = storage.node_cache("scratch")
    os.makedirs(folder, exist_ok=True)
    return folder

# Files read at once in a training pass: mixes examples of several files into the shuffle buffer.
INTERLEAVE = 8
# Files of a bucket downloaded ahead of the one being read, per pipeline.
READ_AHEAD = 2


@dataclasses.dataclass(frozen=True)
class FileSlice:
    path: str  # local path or URI
    skip: int
    take: int


@dataclasses.dataclass(frozen=True)
class Plan:
    files: tuple  # the FileSlices this pipeline opens
    record_sharded: bool  # every pipeline reads all files and keeps its share of the records
    count: int  # examples this pipeline reads


def file_slices(instructions, root: str, first: Optional[int] = None) -> list[FileSlice]:
    """TFDS file instructions of a (sliced) split as FileSlices under `root`, cut to the split's
    `first` examples if given."""
    slices, left = [], first
    for piece in instructions:
        take = piece.take if piece.take >= 0 else piece.examples_in_shard - piece.skip
        if left is not None:
            take = min(take, left)
            left -= take
        if take > 0:
            slices.append(FileSlice(storage.join(root, os.path.basename(piece.filename)), piece.skip, take))
    return slices


def record_share(count: int, input_context=None) -> int:
    """How many of `count` records one pipeline keeps when pipelines deal them round-robin."""
    pipelines = input_context.num_input_pipelines if input_context else 1
    index = input_context.input_pipeline_id if input_context else 0
    return max(count - index + pipelines - 1, 0) // pipelines


def plan(files: list[FileSlice], input_context=None) -> Plan:
    pipelines = input_context.num_input_pipelines if input_context else 1
    if pipelines == 1:
        return Plan(tuple(files), False, sum(f.take for f in files))
    if len(files) >= pipelines:
        mine = tuple(files[input_context.input_pipeline_id::pipelines])
        return Plan(mine, False, sum(f.take for f in mine))
    return Plan(tuple(files), True, record_share(sum(f.take for f in files), input_context))


def shard_records(ds, input_context=None):
    if input_context is not None and input_context.num_input_pipelines > 1:
        return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds


_warned = set()
# Every record file an input pipeline of this process was planned to open: a Ray worker's
# replica record lists them (job.launch), which shows each worker read only its own.
OPENED: set = set()


def records(files: list[FileSlice], input_context=None, shuffle_seed: Optional[int] = None, what: str = "the data"):
    """Serialized records of this pipeline's share of `files`: in file order, or with the files
    in a seeded order drawn anew on every pass, interleaved (`shuffle_seed`)."""
    chosen = plan(files, input_context)
    if chosen.record_sharded and what not in _warned:
        _warned.add(what)
        log.warning("%s: %d record file(s) for %d input pipelines: every worker reads all of them and keeps its "
                    "share (file-level sharding needs at least one file per pipeline; `python -m job prepare` "
                    "writes more)", what, len(files), input_context.num_input_pipelines)
    paths = [f.path for f in chosen.files]
    OPENED.update(paths)
    ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant([f.skip for f in chosen.files], tf.int64),
                                             tf.constant([f.take for f in chosen.files], tf.int64)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    if any(storage.is_uri(p) for p in paths):
        fetch = Fetcher(keep=INTERLEAVE + READ_AHEAD + 1)
        ds = ds.map(lambda path, skip, take: (fetch.as_op(path), skip, take)).prefetch(READ_AHEAD)
    cycle = min(INTERLEAVE, len(paths)) if shuffle_seed is not None else 1
    ds = ds.interleave(lambda path, skip, take: tf.data.TFRecordDataset(path).skip(skip).take(take),
                       cycle_length=max(cycle, 1), block_length=1, num_parallel_calls=max(cycle, 1), deterministic=True)
    return shard_records(ds, input_context) if chosen.record_sharded else ds


@functools.lru_cache(maxsize=16)
def _store(uri_root: str):
    return storage.filesystem(uri_root)[0]


class Fetcher:
    """Downloads a bucket's files to local scratch as the reader reaches them, keeping at most `keep`."""

    def __init__(self, keep: int):
        self.keep = keep
        self.folder = tempfile.mkdtemp(prefix="shards-", dir=_scratch())
        self.local = collections.OrderedDict()  # uri -> local path, oldest first
        self.lock = threading.Lock()
        weakref.finalize(self, shutil.rmtree, self.folder, True)  # at garbage collection or exit

    def fetch(self, uri: str) -> str:
        with self.lock:
            if uri in self.local:
                self.local.move_to_end(uri)
                return self.local[uri]
        scheme, _, rest = uri.partition("://")
        bucket = rest.split("/", 1)[0]
        store = _store(f"{scheme}://{bucket}")
        local = os.path.join(self.folder, hashlib.sha1(uri.encode()).hexdigest()[:12] + "-" + os.path.basename(uri))
        storage._download(store, rest, local)  # noqa: SLF001 - the job's one download helper
        with self.lock:
            self.local[uri] = local
            while len(self.local) > self.keep:
                _, old = self.local.popitem(last=False)
                try:
                    os.remove(old)  # a reader that still has it open keeps reading
                except OSError:
                    pass
        return local

    def as_op(self, uri):
        local = tf.py_function(lambda u: self.fetch(u.numpy().decode()), [uri], tf.string)
        return tf.ensure_shape(local, [])
