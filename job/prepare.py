"""`python -m job prepare IMAGE_DIR DATA_DIR --name NAME`: an image tree as a sharded TFDS dataset.

IMAGE_DIR (a path, s3:// or gs://) holds IMAGE_DIR/<split>/<class>/<image>, or
IMAGE_DIR/<class>/<image> for a single `train` split. DATA_DIR/NAME/1.0.0/ (a path, s3:// or
gs://) then holds record files in TFDS's own format, so `data.name=NAME data.data_dir=DATA_DIR`
trains on it like any TFDS set (split slicing, class names, counts), and `tfds.builder(NAME,
data_dir=DATA_DIR)` reads it too.

- Files are dealt to shards in a fixed order that mixes the classes (a hash of each file's path),
  so any slice of a split holds every class; shards hold about `--shard-mb` MB each and there
  are at least `--min-shards` per split, so every worker of a run has files of its own.
- JPEG and PNG files are stored as they are (never re-encoded); GIF and BMP as PNG. Each file
  is decoded once here (at 1/8 scale for JPEG, which still reads all of it) and a file that does
  not decode is skipped, counted and listed.
- Resumable: a shard is written under a temporary name and renamed (uploaded) when complete,
  then its small record under `.prepare/`; a rerun skips the shards that have one. The
  dataset's metadata is written last.
- `ray.enabled=true` writes the shards as Ray tasks on the cluster (`ray.address`), one per
  shard; otherwise one after the other in this process. A progress bar either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Optional

from job import storage
from job.errors import DataError

log = logging.getLogger(__name__)


def _scratch() -> str:
    folder = storage.node_cache("scratch")
    os.makedirs(folder, exist_ok=True)
    return folder

VERSION = "1.0.0"
SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


@dataclasses.dataclass(frozen=True)
class Shard:
    split: str
    index: int
    of: int
    files: tuple  # (path or URI, label)

    @property
    def filename(self) -> str:
        return f"{{name}}-{self.split}.tfrecord-{self.index:05d}-of-{self.of:05d}"


def _list(root: str) -> list[tuple[str, int]]:
    """(path relative to root, bytes) of every file under `root`, a path or a URI."""
    if storage.is_uri(root):
        from pyarrow import fs

        store, base = storage.filesystem(root)
        infos = store.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        return [(i.path[len(base):].lstrip("/"), i.size) for i in infos if i.type == fs.FileType.File]
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found.append((os.path.relpath(path, root), os.path.getsize(path)))
    return found


def plan(image_dir: str, shard_mb: float, min_shards: int) -> tuple[tuple, list[Shard], dict]:
    """(class names, shards, {split: bytes}) of the tree under `image_dir`; DataError if it is not one."""
    setting = f"IMAGE_DIR={image_dir!r}"
    if not storage.is_uri(image_dir) and not os.path.isdir(image_dir):
        raise DataError(f"{setting}: not a directory")
    files = [(rel.split("/"), size) for rel, size in _list(image_dir) if rel.lower().endswith(SUFFIXES)]
    depths = {len(parts) for parts, _ in files}
    if not files:
        raise DataError(f"{setting}: no {'/'.join(SUFFIXES)} images under {image_dir}/<split>/<class>/ "
                        f"or {image_dir}/<class>/")
    if depths not in ({2}, {3}):
        raise DataError(f"{setting}: images at mixed depths {sorted(depths)}; expected <split>/<class>/<image> "
                        "or <class>/<image> throughout")
    if depths == {2}:  # <class>/<image>: one train split
        files = [(["train", *parts], size) for parts, size in files]
    classes = tuple(sorted({parts[1] for parts, _ in files}))
    if len(classes) < 2:
        raise DataError(f"{setting}: one class ({classes[0]}); a classifier needs at least two class folders")
    label = {name: i for i, name in enumerate(classes)}
    shards, split_bytes = [], {}
    for split in sorted({parts[0] for parts, _ in files}):
        mine = [("/".join(parts), size) for parts, size in files if parts[0] == split]
        mine.sort(key=lambda item: hashlib.sha1(item[0].encode()).hexdigest())  # classes interleave
        total = sum(size for _, size in mine)
        split_bytes[split] = total
        count = min(len(mine), max(min_shards, math.ceil(total / (shard_mb * 2**20))))
        bounds = [round(i * len(mine) / count) for i in range(count + 1)]
        for i in range(count):
            chosen = tuple((storage.join(image_dir, rel), label[rel.split("/")[1]]) for rel, _ in mine[bounds[i]:bounds[i + 1]])
            shards.append(Shard(split, i, count, chosen))
    return classes, shards, split_bytes


def _features(classes: tuple):
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=list(classes)),
    })


def _read(location: str) -> bytes:
    if storage.is_uri(location):
        store, path = storage.filesystem(location)
        with store.open_input_stream(path) as f:
            return f.read()
    with open(location, "rb") as f:
        return f.read()


def checked_bytes(content: bytes) -> Optional[bytes]:
    """The bytes to store for one image file: JPEG and PNG as they are, other formats as PNG;
    None if it does not decode (truncated, not an image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(content)) as image:
            kind = image.format
            if kind == "JPEG":
                image.draft("RGB", (max(image.size[0] // 8, 1), max(image.size[1] // 8, 1)))
            image.load()
            if kind in ("JPEG", "PNG"):
                return content
            out = io.BytesIO()
            image.convert("RGBA" if "A" in image.getbands() else "RGB").save(out, format="PNG")
            return out.getvalue()
    except Exception:  # noqa: BLE001 - any decoding failure means "skip it"
        return None


def _record_path(data_dir: str, name: str, shard: Shard) -> str:
    return storage.join(data_dir, name, VERSION, ".prepare", shard.filename.format(name=name) + ".json")


def _exists(location: str) -> bool:
    if storage.is_uri(location):
        from pyarrow import fs

        store, path = storage.filesystem(location)
        return store.get_file_info(path).type == fs.FileType.File
    return os.path.exists(location)


def _put(local: str, location: str) -> None:
    """Move a finished local file to `location` (renamed locally, uploaded to a bucket)."""
    if storage.is_uri(location):
        store, path = storage.filesystem(location)
        storage._upload(local, store, path)  # noqa: SLF001 - the job's one upload helper
        os.remove(local)
    else:
        os.makedirs(os.path.dirname(location), exist_ok=True)
        os.replace(local, location)


def write_shard(shard: Shard, name: str, data_dir: str, classes: tuple) -> dict:
    """Write one shard (skipped if a previous run finished it); its record: count, bytes, unreadable files."""
    record_location = _record_path(data_dir, name, shard)
    if _exists(record_location):
        return {**json.loads(_read(record_location)), "kept": True}
    import tensorflow as tf
    import tensorflow_datasets as tfds

    features = _features(classes)
    serializer = tfds.core.example_serializer.ExampleSerializer(features.get_serialized_info())
    filename = shard.filename.format(name=name)
    scratch = tempfile.mkdtemp(prefix="prepare-", dir=_scratch())
    try:
        local = os.path.join(scratch, filename)
        count, unreadable = 0, []
        with tf.io.TFRecordWriter(local) as writer:
            for location, label in shard.files:
                try:
                    content = checked_bytes(_read(location))
                except OSError:
                    content = None
                if content is None:
                    unreadable.append(location)
                    continue
                writer.write(serializer.serialize_example(features.encode_example({"image": content, "label": label})))
                count += 1
        record = {"split": shard.split, "index": shard.index, "count": count, "bytes": os.path.getsize(local),
                  "unreadable": unreadable}
        _put(local, storage.join(data_dir, name, VERSION, filename))
        with open(os.path.join(scratch, "record.json"), "w") as f:
            json.dump(record, f)
        _put(os.path.join(scratch, "record.json"), record_location)  # last: the shard is complete
        return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_metadata(name: str, data_dir: str, classes: tuple, records: dict[str, list[dict]], image_dir: str) -> None:
    """dataset_info.json and features.json of the finished shards, as TFDS writes them."""
    import tensorflow_datasets as tfds

    scratch = tempfile.mkdtemp(prefix="prepare-meta-", dir=_scratch())
    try:
        local = os.path.join(scratch, name, VERSION)
        os.makedirs(local)
        identity = tfds.core.dataset_info.DatasetIdentity(name=name, version=tfds.core.Version(VERSION),
                                                          data_dir=local, module_name="")
        info = tfds.core.DatasetInfo(builder=identity, features=_features(classes),
                                     supervised_keys=("image", "label"),
                                     description=f"Images of {image_dir}, prepared by `python -m job prepare`.")
        info.set_file_format(tfds.core.file_adapters.FileFormat.TFRECORD)
        template = tfds.core.ShardedFileTemplate(data_dir=local, dataset_name=name, filetype_suffix="tfrecord")
        splits = [tfds.core.SplitInfo(name=split, shard_lengths=[r["count"] for r in rows],
                                      num_bytes=sum(r["bytes"] for r in rows),
                                      filename_template=template.replace(split=split))
                  for split, rows in records.items()]
        info.set_splits(tfds.core.SplitDict(splits))
        info.write_to_directory(local)
        for file in sorted(os.listdir(local)):
            _put(os.path.join(local, file), storage.join(data_dir, name, VERSION, file))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Progress:
    """A bar on a terminal; elsewhere (a log file, a Ray job) a line at every tenth of the shards."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="prepare", unit="shard", disable=None)
        self.total, self.done, self.images, self.started = total, 0, 0, time.monotonic()

    def update(self, record: dict) -> None:
        self.done += 1
        self.images += record["count"]
        if self.bar.disable and (self.done * 10 // self.total > (self.done - 1) * 10 // self.total):
            log.info("prepare: %d/%d shards, %d images, %.0f images/s", self.done, self.total, self.images,
                     self.images / max(time.monotonic() - self.started, 1e-9))
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _run_shards(shards: list[Shard], name: str, data_dir: str, classes: tuple, config) -> list[dict]:
    """Every shard's record: as Ray tasks on the cluster with ray.enabled, else in this process."""
    bar = _Progress(len(shards))
    if not config.ray.enabled:
        records = []
        for shard in shards:
            records.append(write_shard(shard, name, data_dir, classes))
            bar.update(records[-1])
        bar.close()
        return records
    import ray

    from job.launch import _connect

    started = _connect(config)
    log.info("prepare: %d shards as ray tasks on %s", len(shards), "a local Ray" if started and not config.ray.address
             else "the cluster")
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(write_shard)
        pending = {task.remote(shard, name, data_dir, classes): i for i, shard in enumerate(shards)}
        records = [None] * len(shards)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                records[index] = ray.get(ref)
                bar.update(records[index])
        bar.close()
        return records
    finally:
        if started:
            ray.shutdown()


def prepare(image_dir: str, data_dir: str, name: str, config, shard_mb: float = 150.0, min_shards: int = 16) -> dict:
    """Write the dataset (skipping finished shards); a summary of what it holds."""
    if not name.isidentifier() or name != name.lower():
        raise DataError(f"--name {name!r}: a TFDS name is lowercase letters, digits and underscores, "
                        "starting with a letter")
    classes, shards, split_bytes = plan(image_dir, shard_mb, min_shards)
    log.info("prepare: %d images of %d classes in %s -> %d shards in %s", sum(len(s.files) for s in shards),
             len(classes), ", ".join(f"{split} ({size / 2**20:,.1f} MB)" for split, size in split_bytes.items()),
             len(shards), storage.join(data_dir, name, VERSION))
    records = _run_shards(shards, name, data_dir, classes, config)
    by_split: dict[str, list[dict]] = {}
    for shard, record in zip(shards, records):
        by_split.setdefault(shard.split, []).append(record)
    kept = sum(1 for record in records if record.get("kept"))
    if kept:
        log.info("prepare: %d of %d shards were written by an earlier run and are kept", kept, len(records))
    unreadable = [path for record in records for path in record["unreadable"]]
    if unreadable:
        log.warning("prepare: %d file(s) do not decode and were skipped: %s", len(unreadable), ", ".join(unreadable))
    if not all(sum(r["count"] for r in rows) for rows in by_split.values()):
        raise DataError(f"IMAGE_DIR={image_dir!r}: a split has no image that decodes")
    write_metadata(name, data_dir, classes, by_split, image_dir)
    return {"name": name, "data_dir": data_dir, "classes": len(classes),
            "splits": {split: {"examples": sum(r["count"] for r in rows), "shards": len(rows),
                               "mb": round(sum(r["bytes"] for r in rows) / 2**20, 1)} for split, rows in by_split.items()},
            "unreadable": len(unreadable)}
