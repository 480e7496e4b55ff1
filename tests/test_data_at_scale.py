"""Data at scale: `python -m job prepare`, file-level sharding, streaming decode, memory limits.

The image trees here are small and synthetic (each class its own colour, JPEG of several
sizes, a PNG, a GIF and a broken file), so these run in seconds and need nothing from
../shared; the end-to-end runs on real images live in the benchmark (`python -m job benchmark`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from job import caches, container, shards
from job import data as data_lib
from job.config import load_config
from job.prepare import prepare
from tests.conftest import REPO, run_job, tiny

CLASSES = ("cat", "dog", "fox")
COLOURS = {"cat": (220, 40, 40), "dog": (40, 220, 40), "fox": (40, 40, 220)}


def _image_bytes(colour, size, fmt: str, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format=fmt)
    return out.getvalue()


def write_tree(root: Path, per_class: int = 20) -> Path:
    """root/<split>/<class>/<image>: JPEGs of sizes 40..80 px, one PNG and one GIF, one broken file."""
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            split = "train" if i < per_class * 3 // 4 else "validation"
            fmt, suffix = {0: ("PNG", "png"), 1: ("GIF", "gif")}.get(i, ("JPEG", "jpg"))
            path = root / split / name / f"{i:03d}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_image_bytes(COLOURS[name], (40 + 7 * i % 41, 48 + 5 * i % 33), fmt, c * 100 + i))
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tree and the dataset `prepare` wrote from it (4 shards per split), with prepare's summary."""
    root = tmp_path_factory.mktemp("scale")
    tree = write_tree(root / "tree")
    summary = prepare(str(tree), str(root / "data"), "colours", load_config(None, []), min_shards=4)
    return tree, root / "data", summary


def _data(data_dir, *overrides):
    return load_config(None, [f"data.data_dir={data_dir}", "data.name=colours", "data.train_split=train",
                              "data.val_split=validation", *overrides]).data


# --- prepare ---------------------------------------------------------------------------------


def test_prepare_writes_a_tfds_dataset_with_jpegs_as_they_were_and_lists_the_broken_file(prepared, caplog):
    tree, data_dir, summary = prepared
    assert summary["splits"] == {"train": {"examples": 45, "shards": 4, "mb": summary["splits"]["train"]["mb"]},
                                 "validation": {"examples": 15, "shards": 4, "mb": summary["splits"]["validation"]["mb"]}}
    assert summary["unreadable"] == 1
    builder = tfds.builder("colours", data_dir=str(data_dir))
    assert builder.info.features["label"].names == list(CLASSES)
    assert builder.info.splits["train[:80%]"].num_examples == 36
    stored = {bytes(ex["image"]) for ex in tfds.as_numpy(builder.as_dataset(
        split="train", decoders={"image": tfds.decode.SkipDecoding()}))}
    jpeg = (tree / "train" / "fox" / "005.jpg").read_bytes()
    assert jpeg in stored  # not re-encoded
    labels = [int(ex["label"]) for ex in tfds.as_numpy(builder.as_dataset(split="train[:12]"))]
    assert set(labels) == {0, 1, 2}  # any slice holds every class: files dealt in a mixed order


def test_a_rerun_of_prepare_skips_the_shards_already_written(prepared, tmp_path):
    tree, data_dir, summary = prepared
    version = data_dir / "colours" / "1.0.0"
    shard = next(version.glob("colours-train.tfrecord-*"))
    before = {p.name: p.stat().st_mtime_ns for p in version.glob("*.tfrecord-*")}
    (version / ".prepare" / f"{shard.name}.json").unlink()  # as if interrupted before this shard finished
    again = prepare(str(tree), str(data_dir), "colours", load_config(None, []), min_shards=4)
    after = {p.name: p.stat().st_mtime_ns for p in version.glob("*.tfrecord-*")}
    assert again == summary
    assert [name for name in before if before[name] != after[name]] == [shard.name]


def test_prepare_refuses_a_tree_that_is_not_one_in_a_line(tmp_path):
    (tmp_path / "only" / "cat").mkdir(parents=True)
    (tmp_path / "only" / "cat" / "a.jpg").write_bytes(_image_bytes((1, 2, 3), (8, 8), "JPEG", 0))
    result = run_job("prepare", str(tmp_path / "only"), str(tmp_path / "out"), "--name", "x")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: IMAGE_DIR={str(tmp_path / 'only')!r}: one class (cat); a classifier needs at least two class folders")
    bad_name = run_job("prepare", str(tmp_path), str(tmp_path / "out"), "--name", "My-Set")
    assert bad_name.returncode == 2 and "--name 'My-Set'" in bad_name.stderr.strip().splitlines()[-1]


# --- file-level sharding -----------------------------------------------------------------------


def _labels_and_files(data, pipelines: int, index: int):
    context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=index)
    source = data_lib.sources.open_source(data)
    chosen = shards.plan(source._files("train", None), context)  # noqa: SLF001 - what the pipeline opens
    examples = [bytes(image.numpy()) for image, _ in source.examples("train", context)]
    return examples, {os.path.basename(f.path) for f in chosen.files}, chosen.record_sharded


def test_each_pipeline_opens_only_its_own_files_and_together_they_read_the_split_once(prepared):
    _, data_dir, _ = prepared
    data = _data(data_dir)
    everything, all_files, _ = _labels_and_files(data, 1, 0)
    parts = [_labels_and_files(data, 2, i) for i in range(2)]
    assert not parts[0][1] & parts[1][1] and parts[0][1] | parts[1][1] == all_files
    assert not any(sharded for _, _, sharded in parts)
    assert sorted(parts[0][0] + parts[1][0]) == sorted(everything)
    assert [data_lib.shard_count(data, "train", None, tf.distribute.InputContext(2, i)) for i in range(2)] == \
        [len(parts[0][0]), len(parts[1][0])]


def test_fewer_files_than_pipelines_falls_back_to_records_with_one_warning(prepared, caplog):
    _, data_dir, _ = prepared
    data = _data(data_dir)
    shards._warned.clear()
    with caplog.at_level(logging.WARNING, logger="job.shards"):
        parts = [_labels_and_files(data, 5, i) for i in range(5)]
    assert all(sharded for _, _, sharded in parts)
    assert sum(len(p[0]) for p in parts) == 45 and len({b for p in parts for b in p[0]}) == 45
    warnings = [r.getMessage() for r in caplog.records if "record file(s) for 5 input pipelines" in r.getMessage()]
    assert len(warnings) == 1


# --- streaming: decode fused with the crop, bounded shuffle, exact resume -----------------------


def test_a_jpeg_is_decoded_only_inside_its_crop_window_with_the_same_pixels():
    encoded = tf.constant(_image_bytes((90, 120, 200), (97, 61), "JPEG", 3))
    seed = tf.constant([7, 11], tf.int64)
    fused = data_lib.decode_crop_resize(encoded, 48, "bilinear", seed)
    whole = tf.io.decode_jpeg(encoded, channels=3)
    top, left, height, width = data_lib.crop_window(tf.shape(whole), seed).numpy()
    crop = whole[top:top + height, left:left + width]
    expected = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(crop, (48, 48), antialias=True)), 0, 255), tf.uint8)
    assert fused.shape == (48, 48, 3)
    # The same pixels, but for chroma upsampling at the window's edge (libjpeg sees no neighbour there).
    difference = np.abs(fused.numpy().astype(int) - expected.numpy().astype(int))
    assert difference.max() <= 3 and np.mean(difference == 0) > 0.99
    assert height * width < 97 * 61  # a crop, not the whole image
    centre = data_lib.crop_window(tf.constant([61, 97, 3]), None).numpy().tolist()
    assert centre == [0, 18, 61, 61]


def test_a_streamed_pipeline_resumed_at_a_batch_sees_the_same_batches(prepared):
    _, data_dir, _ = prepared
    data = _data(data_dir, "data.cache=none", "data.augment=resized_crop")
    context = tf.distribute.InputContext(2, 1)

    def batches(skip, count):
        ds = data_lib.train_dataset(data, "train", 4, 32, seed=5, skip_batches=skip, input_context=context)
        return [images.numpy() for images, _ in ds.take(count)]

    whole, resumed = batches(0, 9), batches(6, 3)
    assert all(b.shape == (4, 32, 32, 3) for b in whole)
    for a, b in zip(whole[6:], resumed):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole[0], whole[6])


def test_the_shuffle_buffer_is_bounded_in_bytes(prepared):
    _, data_dir, _ = prepared
    info = data_lib.dataset_info(_data(data_dir), ["train"])
    per_example = info.split_bytes["train"] / info.split_sizes["train"]
    tight = _data(data_dir, f"data.shuffle_buffer_mb={10 * per_example / 2**20}")
    assert data_lib.shuffle_buffer(tight, info, "train") == 10
    assert data_lib.shuffle_buffer(_data(data_dir), info, "train") == 50_000  # the count binds first


# --- memory: the container's limit, caches placed against it ------------------------------------


def test_the_memory_limit_is_read_from_the_process_own_cgroup(tmp_path):
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "kubepods" / "memory.max").write_text(f"{3 * 2**30}\n")
    (root / "kubepods" / "pod1" / "memory.max").write_text("max\n")
    proc.write_text("0::/kubepods/pod1\n")
    limit = container.memory_limit(str(proc), str(root))
    assert (limit.bytes, limit.source) == (3 * 2**30, "cgroup v2 memory.max")  # the parent's limit binds
    (root / "memory" / "docker" / "abc").mkdir(parents=True)
    (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    proc.write_text("4:memory:/docker/abc\n1:cpu:/\n")
    assert container.memory_limit(str(proc), str(root)).bytes == 2**30
    proc.write_text("4:memory:/\n")
    assert container.memory_limit(str(proc), str(root)).source == "physical memory"


def _memory_cgroup(tmp_name: str, limit: int):
    """A real memory cgroup (v2 memory.max or v1 memory.limit_in_bytes) with `limit`; None if not allowed."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    base = Path("/sys/fs/cgroup") if v2.exists() else Path("/sys/fs/cgroup/memory")
    group = base / tmp_name
    try:
        group.mkdir(exist_ok=True)
        (group / ("memory.max" if v2.exists() else "memory.limit_in_bytes")).write_text(str(limit))
    except OSError:
        return None
    return group


def test_a_process_in_a_memory_limited_cgroup_reads_that_limit():
    group = _memory_cgroup(f"job-test-{os.getpid()}", 3 * 2**30)
    if group is None:
        pytest.skip("cannot create a memory cgroup here (not root, or no memory controller)")
    try:
        code = "from job.container import memory_limit; l = memory_limit(); print(l.bytes, l.source)"
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                             preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        size, source = out.stdout.split(maxsplit=1)
        assert int(size) == 3 * 2**30 and source.strip().startswith("cgroup")
    finally:
        group.rmdir()


def test_caches_go_to_memory_only_when_they_fit_the_budget(prepared):
    _, data_dir, _ = prepared
    data = _data(data_dir)
    info = data_lib.dataset_info(data, ["train", "validation"])
    splits = ["train", "validation"]
    decoded = data_lib.cache_bytes(60, info.image_shape, data_lib.cache_size(data, info.image_shape, 64))
    encoded = info.split_bytes["train"] + info.split_bytes["validation"]
    assert encoded < decoded

    def placed(limit_bytes):
        budget = caches.CacheBudget(0.5, 1, container.MemoryLimit(limit_bytes, "cgroup v2 memory.max"))
        return caches.image_cache(data, info, splits, 64, budget).cache, budget.statement()

    assert placed(4 * decoded)[0] == "memory"
    choice, line = placed(decoded)  # half of it is the budget: the encoded bytes still fit
    assert choice == "raw" and "-> not cached (decoded as read)" in line and "encoded images" in line
    choice, line = placed(encoded)
    assert choice == "none" and "cgroup v2 memory.max" in line and "streamed from the files" in line


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_on_a_prepared_dataset_streams_it_and_logs_where_the_caches_went(prepared, tmp_path):
    _, data_dir, _ = prepared
    result = run_job("train", "configs/tiny.yaml", *tiny(
        f"data.data_dir={data_dir}", "data.name=colours", "data.train_split=train", "data.val_split=validation",
        "data.cache=none", "model.image_size=48", "train.batch_size=8"), f"workdir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoded images (uint8 55x55, train: 45, validation: 15)" in result.stderr  # 48 px x 8/7
    assert "-> not cached (streamed from the files and decoded every epoch)" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished"


# --- buckets -----------------------------------------------------------------------------------


def _upload_tree(uri: str, tree: Path) -> None:
    from job import storage

    for path in tree.rglob("*"):
        if path.is_file():
            store, root = storage.filesystem(f"{uri}/{path.relative_to(tree).as_posix()}")
            storage._upload(str(path), store, root)  # noqa: SLF001


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_prepare_from_a_bucket_into_a_bucket_and_two_pipelines_fetch_only_their_own_files(prepared, store, request,
                                                                                         monkeypatch, tmp_path):
    server = request.getfixturevalue(f"{store}_env")
    scheme = {"s3": "s3", "gcs": "gs"}[store]
    tree, _, local_summary = prepared
    bucket = server.bucket()
    _upload_tree(f"{scheme}://{bucket}/tree", tree)
    monkeypatch.setenv("JOB_CACHE_DIR", str(tmp_path / "node"))
    summary = prepare(f"{scheme}://{bucket}/tree", f"{scheme}://{bucket}/data", "colours", load_config(None, []),
                      min_shards=4)
    assert summary["splits"] == {**local_summary["splits"]} and summary["unreadable"] == 1
    keys = server.keys(bucket, "data/")
    assert "data/colours/1.0.0/dataset_info.json" in keys
    assert len([k for k in keys if ".tfrecord-" in k and "/.prepare/" not in k]) == 8

    fetched = []
    real_download = data_lib.sources.storage._download  # noqa: SLF001

    def recording(store, path, local):
        fetched.append(os.path.basename(path))
        real_download(store, path, local)

    monkeypatch.setattr(data_lib.sources.storage, "_download", recording)
    data = _data(f"{scheme}://{bucket}/data")
    read = []
    for index in range(2):
        fetched.clear()
        context = tf.distribute.InputContext(2, index)
        read.append([bytes(image.numpy()) for image, _ in data_lib.sources.open_source(data).examples("train", context)])
        mine = [f for f in fetched if ".tfrecord-" in f]
        assert sorted(mine) == [f"colours-train.tfrecord-{i:05d}-of-00004" for i in range(index, 4, 2)]
    assert len(read[0]) + len(read[1]) == 45 and not set(read[0]) & set(read[1])
    # Only the metadata is mirrored onto the node; record files pass through a bounded scratch.
    assert [p.name for p in (tmp_path / "node" / "tfds").rglob("*.tfrecord-*")] == []
    assert sorted(p.name for p in (tmp_path / "node" / "tfds").rglob("*.json")) == ["dataset_info.json", "features.json"]


@pytest.mark.ray
def test_prepare_on_ray_writes_the_shards_as_tasks(tmp_path):
    tree = write_tree(tmp_path / "tree", per_class=8)
    result = run_job("prepare", str(tree), str(tmp_path / "data"), "--name", "colours", "--min-shards", "3",
                     "ray.enabled=true", "ray.address=null", env={"RAY_ADDRESS": ""}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["splits"]["train"]["shards"] == 3 and summary["unreadable"] == 1
    assert "ray tasks" in result.stderr  # the engine it ran on, in its log line
    builder = tfds.builder("colours", data_dir=str(tmp_path / "data"))
    assert builder.info.splits["train"].num_examples == 18


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_workers_train_on_a_prepared_dataset_in_a_bucket_each_reading_its_own_files(prepared, s3_env, tmp_path):
    tree, _, _ = prepared
    bucket = s3_env.bucket()
    result = run_job("prepare", str(tree), f"s3://{bucket}/data", "--name", "colours", "--min-shards", "4",
                     env=s3_env.env)
    assert result.returncode == 0, result.stderr[-3000:]
    workdir, storage = tmp_path / "run", tmp_path / "ray"
    result = run_job("train", "configs/tiny.yaml", *tiny(
        f"data.data_dir=s3://{bucket}/data", "data.name=colours", "data.train_split=train", "data.val_split=validation",
        "model.image_size=32", "train.batch_size=8", "checkpoint.every_steps=1000", "ray.enabled=true",
        "ray.num_workers=2", "ray.cpus_per_worker=1", f"ray.storage_path={storage}", "ray.name=colours"),
        f"workdir={workdir}", env={**s3_env.env, "RAY_ADDRESS": ""}, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    from tests.ray_helpers import local_replica_records

    records = {r["rank"]: set(r["record_files"]) for r in local_replica_records(workdir)}
    assert set(records) == {0, 1}
    train = {rank: {f for f in files if "-train." in f} for rank, files in records.items()}
    assert train[0] == {f"colours-train.tfrecord-{i:05d}-of-00004" for i in (0, 2)}
    assert train[1] == {f"colours-train.tfrecord-{i:05d}-of-00004" for i in (1, 3)}


def test_a_resume_on_another_worker_count_says_how_far_from_exact_in_examples():
    import types

    from job.config import PhaseConfig
    from job.step import Phase
    from job.train import _order_changed

    phases = [Phase("head", PhaseConfig(epochs=1, learning_rate=1e-3), 0, 10, 10),
              Phase("finetune", PhaseConfig(epochs=2, learning_rate=1e-4), 10, 20, 10)]
    run = types.SimpleNamespace(inputs=types.SimpleNamespace(pipelines=3), step=tf.Variable(23, dtype=tf.int64),
                                phases=phases, global_batch=32)
    assert _order_changed({"input_pipelines": 3}, run) is None
    assert _order_changed({}, run) is None  # a record from before pipelines were recorded: nothing to compare
    note = _order_changed({"input_pipelines": 2}, run)
    assert note.startswith("resuming with 3 input pipeline(s) where the interrupted run had 2")
    assert "finetune epoch is a new draw: up to 96 examples (those seen before the interruption)" in note


def test_a_large_image_folder_starts_on_headers_and_points_at_prepare(prepared, monkeypatch, caplog):
    from PIL import ImageFile

    from job import image_folder

    tree, _, _ = prepared
    image_folder.scan.cache_clear()
    monkeypatch.setattr(image_folder, "LARGE_FOLDER", 10)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a: decoded.append(self) or None)
    with caplog.at_level(logging.INFO, logger="job.image_folder"):
        folder = image_folder.scan(str(tree))
    image_folder.scan.cache_clear()
    assert decoded == []  # headers only: no image was decoded to start
    assert sum(len(files) for files in folder.files.values()) == 60 and len(folder.unreadable) == 1
    assert any("`python -m job prepare" in r.getMessage() for r in caplog.records)
