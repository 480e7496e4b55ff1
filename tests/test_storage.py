"""Workdirs in object storage, on a real S3-protocol server (moto_server) and a real
GCS-protocol server (fake-gcs-server) on 127.0.0.1.

The job reaches the first as it reaches AWS, MinIO or R2: through the standard AWS variables,
AWS_ENDPOINT_URL included; the second as Google's client libraries reach an emulator or a
private endpoint: through STORAGE_EMULATOR_HOST. One run writes into s3:// (gs://) from
node-local scratch; a rerun with no scratch at all resumes from the bucket; `evaluate` and
`python -m job tensorboard` read it. `pytest -k gcs` runs the gs:// ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from job.errors import WorkdirBusy
from job.storage import RemoteLease, Workdir, WorkdirLock, is_uri, join
from tests.conftest import DATASETS, EXPORTS, KERAS_HOME, REPO, WEIGHTS, free_port, http_json, job_env, run_job, tiny


def test_uris_never_go_through_path_helpers():
    assert is_uri("s3://b/x") and is_uri("gs://b") and not is_uri("/data/runs") and not is_uri("runs/x")
    assert join("s3://b/runs/", "ray", "x") == "s3://b/runs/ray/x"
    assert Workdir.open("s3://b/runs/x/").location == "s3://b/runs/x"
    local = Workdir.open("runs/x")
    assert local.location == local.local == os.path.abspath("runs/x") and not local.remote


def test_push_sends_changes_mirrors_deletions_and_pull_restores(s3_env, tmp_path):
    bucket = s3_env.bucket()
    workdir = Workdir.open(f"s3://{bucket}/run")
    os.makedirs(workdir.path("checkpoints"))
    for name, text in [("ckpt-1.index", "a"), ("ckpt-1.data", "b"), ("checkpoint", "ckpt-1")]:
        with open(workdir.path("checkpoints", name), "w") as f:
            f.write(text)
    workdir.push("checkpoints", mirror=True, last=("checkpoint",))
    os.remove(workdir.path("checkpoints", "ckpt-1.data"))
    workdir.push("checkpoints", mirror=True)
    assert s3_env.keys(bucket) == ["run/checkpoints/checkpoint", "run/checkpoints/ckpt-1.index"]
    workdir.close()
    assert not os.path.exists(workdir.local)

    fresh = Workdir.open(f"s3://{bucket}/run")
    assert fresh.pull("checkpoints") and open(fresh.path("checkpoints", "checkpoint")).read() == "ckpt-1"
    assert not fresh.pull("tensorboard")
    fresh.close()


def test_a_live_lease_refuses_a_second_run_and_a_dead_one_is_taken_over(s3_env):
    bucket = s3_env.bucket()
    workdir = Workdir.open(f"s3://{bucket}/run")
    with RemoteLease(workdir) as first:
        with pytest.raises(WorkdirBusy, match=rf"in use by run {first.record['run']} \(host {socket.gethostname()}, "
                                              rf"pid {os.getpid()}"):
            RemoteLease(Workdir.open(f"s3://{bucket}/run")).__enter__()
    assert s3_env.keys(bucket) == []  # released
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = RemoteLease(workdir)
    stale.record["pid"] = dead.pid  # a run on this host whose process is gone
    stale._write()
    with RemoteLease(workdir) as second:
        assert json.loads(s3_env.client().get_object(Bucket=bucket, Key="run/.lock.json")["Body"].read())["run"] == \
            second.record["run"]


# --- the store stops answering mid-run (SIGSTOP to moto_server) --------------------------------
#
# The run pauses at known steps (JOB_TEST_HOLD_STEPS: it writes held-<step> into
# JOB_TEST_HOLD_DIR and waits for go-<step>), so the store is frozen and thawed at known
# points of training, never after a sleep.

def _hold_until(path, job, what: str) -> None:
    from tests.ray_helpers import wait_for

    wait_for(path.exists, 300, what, interval=0.05, alive=lambda: job.poll() is None)


def _index_names(s3, bucket: str, key: str):
    if key not in s3.keys(bucket, key):
        return None
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode().split('"')[1]


def _store_checkpoints_read_back(s3, bucket: str, prefix: str) -> dict:
    """{checkpoint: its saved global step}, for every checkpoint the store's index lists, each
    read back whole (every tensor) from a fresh copy of the store's checkpoints folder."""
    import tensorflow as tf

    workdir = Workdir.open(f"s3://{bucket}/{prefix}")
    env = pytest.MonkeyPatch()
    try:
        for key, value in s3.env.items():  # this process to the server (a module fixture has no monkeypatch)
            env.setenv(key, value)
        assert workdir.pull("checkpoints")
        state = tf.train.get_checkpoint_state(workdir.path("checkpoints"))
        steps = {}
        for path in state.all_model_checkpoint_paths:
            reader = tf.train.load_checkpoint(workdir.path("checkpoints", os.path.basename(path)))
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
            steps[os.path.basename(path)] = int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
        return steps
    finally:
        env.undo()
        workdir.close()


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory):
    """One real run into s3:// (real data, real weights, a profile), then the same command with
    one more fine-tune epoch: the rerun has no local scratch left and must resume from the bucket.

    The first run meets a store that stops answering (tests below): once ckpt-4 is complete
    in the bucket the server is frozen (SIGSTOP), and thawed only when training has reached
    step 12 (checkpoints 8 and 12 saved meanwhile, two checkpoint intervals). The run pauses at
    those steps (JOB_TEST_HOLD_STEPS) so that this happens at known points, never after a sleep.
    What the bucket holds after it is read back before the rerun changes it."""
    from tests.ray_helpers import start_job

    if not (DATASETS / "cifar10").is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"offline CIFAR-10 and weights not found under {DATASETS.parent}")
    bucket = s3.bucket()
    scratch = tmp_path_factory.mktemp("scratch")  # TMPDIR: where each process's scratch goes
    holds = tmp_path_factory.mktemp("holds")
    env = {**s3.env, "TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME), "TMPDIR": str(scratch)}
    args = ["train", "configs/tiny.yaml", *tiny("model.image_size=64", "telemetry.profile_steps=[1,3]", EXPORTS),
            f"workdir=s3://{bucket}/runs/tiny"]
    job = start_job(args, {**env, "JOB_TEST_HOLD_STEPS": "4,12", "JOB_TEST_HOLD_DIR": str(holds)}, holds / "job.log")
    with _store_frozen_after_step_4(s3, bucket, "runs/tiny", job, holds) as thaw:
        _hold_until(holds / "held-12", job, "step 12 with the store frozen")  # training went on
        thaw()
        (holds / "go-12").touch()
        status = job.wait(timeout=600)
    log = (holds / "job.log").read_text()
    if status != 0:
        raise AssertionError(f"exit {status}\n{log[-5000:]}")
    first = subprocess.CompletedProcess(args, status, stdout=log, stderr=log)
    keys_after_first = s3.keys(bucket)
    read_back = _store_checkpoints_read_back(s3, bucket, "runs/tiny")
    leftovers = sorted(os.listdir(scratch))
    second = run_job(*args, "train.finetune.epochs=2", "export.after_train=false", env=env, check=True)  # the resume
    return bucket, env, first, second, keys_after_first, leftovers, read_back


@pytest.mark.real_data
def test_a_run_into_s3_leaves_everything_in_the_bucket(s3_run):
    bucket, _, first, _, keys, leftovers, _ = s3_run
    assert json.loads(first.stdout.strip().splitlines()[-1])["step"] == 16
    prefix = "runs/tiny/"
    names = [k[len(prefix):] for k in keys]
    assert {"config.yaml", "summary.json", "checkpoints/checkpoint", "checkpoints/ckpt-16.index",
            "run.json", "export/model.keras", "export/saved_model/saved_model.pb"} <= set(names), names
    assert any(re.fullmatch(r"tensorboard/train/events\.out\.tfevents\..*", n) for n in names)
    assert any(re.fullmatch(r"tensorboard/validation/events\.out\.tfevents\..*", n) for n in names)
    assert any(re.fullmatch(r"tensorboard/train/plugins/profile/[^/]+/[^/]+\.xplane\.pb", n) for n in names)
    assert ".lock.json" not in names  # the lease is released at the end
    assert len([n for n in names if n.startswith("checkpoints/ckpt-") and n.endswith(".index")]) <= 3  # rotation mirrored
    assert leftovers == []  # local scratch is deleted at the end


@pytest.mark.real_data
def test_a_rerun_without_scratch_resumes_from_the_bucket(s3_run, s3):
    bucket, _, _, second, *_ = s3_run
    assert re.search(r"resumed from \S+/checkpoints/ckpt-16 at step 16", second.stderr), second.stderr[-3000:]
    summary = json.loads(s3.client().get_object(Bucket=bucket, Key="runs/tiny/summary.json")["Body"].read())
    assert summary["step"] == 24 and summary["status"] == "finished"
    assert [row["step"] for row in summary["validation_history"]] == [8, 16, 24]  # the history went on


@pytest.mark.real_data
def test_evaluate_reads_the_model_back_from_the_bucket(s3_run):
    bucket, env, _, second, *_ = s3_run
    result = run_job("evaluate", "configs/tiny.yaml", *tiny("model.image_size=64"), f"workdir=s3://{bucket}/runs/tiny",
                     "data.eval_split=train[49872:]", env=env, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    final = json.loads(second.stdout.strip().splitlines()[-1])["final_val_accuracy"]
    assert report["examples"] == 128 and report["accuracy"] == pytest.approx(final, abs=1e-6)


@pytest.mark.real_data
def test_tensorboard_command_follows_an_s3_workdir(s3_run):
    bucket, env, *_ = s3_run
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "job", "tensorboard", f"s3://{bucket}/runs/tiny", "--port", str(port),
                              "--every", "5"], cwd=REPO, env=job_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        tags = http_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", deadline)
        while "finetune/loss" not in tags.get("train", {}) and time.monotonic() < deadline:
            tags = http_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", deadline)  # its first scan
        assert "finetune/loss" in tags["train"] and "finetune/accuracy" in tags["validation"]
        runs = http_json(f"http://127.0.0.1:{port}/data/plugin/profile/runs", deadline)
        assert any(r.startswith("train/") for r in runs), runs
    finally:
        board.terminate()
        board.wait(timeout=60)


@pytest.mark.real_data
def test_a_missing_bucket_is_one_line_and_writes_nothing(s3_env, real_env, tmp_path):
    result = run_job("train", "configs/tiny.yaml", *tiny(), "workdir=s3://no-such-bucket/run", env={**s3_env.env, **real_env})
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == ("error: workdir='s3://no-such-bucket/run': bucket 'no-such-bucket' does not "
                                     "exist (or is not visible with these credentials)")


# --- gs:// on fake-gcs-server: the same tests -------------------------------------------------

def test_gcs_push_sends_changes_mirrors_deletions_and_pull_restores(gcs_env):
    bucket = gcs_env.bucket()
    workdir = Workdir.open(f"gs://{bucket}/run")
    os.makedirs(workdir.path("checkpoints"))
    for name, text in [("ckpt-1.index", "a"), ("ckpt-1.data", "b"), ("checkpoint", "ckpt-1")]:
        with open(workdir.path("checkpoints", name), "w") as f:
            f.write(text)
    workdir.push("checkpoints", mirror=True, last=("checkpoint",))
    os.remove(workdir.path("checkpoints", "ckpt-1.data"))
    workdir.push("checkpoints", mirror=True)
    assert gcs_env.keys(bucket) == ["run/checkpoints/checkpoint", "run/checkpoints/ckpt-1.index"]
    workdir.close()

    fresh = Workdir.open(f"gs://{bucket}/run")
    assert fresh.pull("checkpoints") and open(fresh.path("checkpoints", "checkpoint")).read() == "ckpt-1"
    assert not fresh.pull("tensorboard")
    fresh.close()


def test_gcs_lease_refuses_a_live_run_and_takes_over_a_dead_one(gcs_env):
    bucket = gcs_env.bucket()
    workdir = Workdir.open(f"gs://{bucket}/run")
    with RemoteLease(workdir) as first:
        with pytest.raises(WorkdirBusy, match=rf"in use by run {first.record['run']} \(host {socket.gethostname()}, "
                                              rf"pid {os.getpid()}"):
            RemoteLease(Workdir.open(f"gs://{bucket}/run")).__enter__()
    assert gcs_env.keys(bucket) == []  # released
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = RemoteLease(workdir)
    stale.record["pid"] = dead.pid
    stale._write()
    with RemoteLease(workdir) as second:
        assert json.loads(gcs_env.read(bucket, "run/.lock.json"))["run"] == second.record["run"]


def test_gcs_emulator_host_without_a_scheme_is_http(monkeypatch, gcs):
    from job.storage import filesystem

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url.removeprefix("http://"))
    bucket = gcs.bucket()
    store, path = filesystem(f"gs://{bucket}/x/")
    assert path == f"{bucket}/x" and store.get_file_info(bucket).type.name == "Directory"


@pytest.fixture(scope="module")
def gcs_run(gcs, tmp_path_factory):
    """s3_run on gs://: one real run, then the same command with one more fine-tune epoch from no scratch."""
    if not (DATASETS / "cifar10").is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"offline CIFAR-10 and weights not found under {DATASETS.parent}")
    bucket = gcs.bucket()
    scratch = tmp_path_factory.mktemp("scratch")
    env = {**gcs.env, "TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME), "TMPDIR": str(scratch)}
    args = ["train", "configs/tiny.yaml", *tiny("model.image_size=64", "telemetry.profile_steps=[1,3]", EXPORTS),
            f"workdir=gs://{bucket}/runs/tiny"]
    first = run_job(*args, env=env, check=True)
    keys_after_first = gcs.keys(bucket)
    leftovers = sorted(os.listdir(scratch))
    second = run_job(*args, "train.finetune.epochs=2", "export.after_train=false", env=env, check=True)  # the resume
    return bucket, env, first, second, keys_after_first, leftovers


@pytest.mark.slow
@pytest.mark.real_data
def test_a_run_into_gcs_leaves_everything_in_the_bucket(gcs_run):
    bucket, _, first, _, keys, leftovers = gcs_run
    assert json.loads(first.stdout.strip().splitlines()[-1])["step"] == 16
    prefix = "runs/tiny/"
    names = [k[len(prefix):] for k in keys]
    assert {"config.yaml", "summary.json", "checkpoints/checkpoint", "checkpoints/ckpt-16.index",
            "run.json", "export/model.keras", "export/saved_model/saved_model.pb"} <= set(names), names
    assert any(re.fullmatch(r"tensorboard/train/events\.out\.tfevents\..*", n) for n in names)
    assert any(re.fullmatch(r"tensorboard/validation/events\.out\.tfevents\..*", n) for n in names)
    assert any(re.fullmatch(r"tensorboard/train/plugins/profile/[^/]+/[^/]+\.xplane\.pb", n) for n in names)
    assert ".lock.json" not in names
    assert len([n for n in names if n.startswith("checkpoints/ckpt-") and n.endswith(".index")]) <= 3
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.real_data
def test_a_gcs_rerun_without_scratch_resumes_from_the_bucket(gcs_run, gcs):
    bucket, _, _, second, _, _ = gcs_run
    assert re.search(r"resumed from \S+/checkpoints/ckpt-16 at step 16", second.stderr), second.stderr[-3000:]
    summary = json.loads(gcs.read(bucket, "runs/tiny/summary.json"))
    assert summary["step"] == 24 and summary["status"] == "finished"
    assert [row["step"] for row in summary["validation_history"]] == [8, 16, 24]


@pytest.mark.slow
@pytest.mark.real_data
def test_evaluate_and_export_read_the_model_back_from_gcs(gcs_run, gcs):
    bucket, env, _, second, _, _ = gcs_run
    workdir = [f"workdir=gs://{bucket}/runs/tiny", *tiny("model.image_size=64")]
    result = run_job("evaluate", "configs/tiny.yaml", *workdir, "data.eval_split=train[49872:]", env=env, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    final = json.loads(second.stdout.strip().splitlines()[-1])["final_val_accuracy"]
    assert report["examples"] == 128 and report["accuracy"] == pytest.approx(final, abs=1e-6)
    before = gcs.keys(bucket, "runs/tiny/export/")
    exported = run_job("export", "configs/tiny.yaml", *workdir, env=env, check=True)
    assert "ckpt-24" in exported.stderr, exported.stderr[-3000:]
    assert "runs/tiny/export/model.keras" in before and gcs.keys(bucket, "runs/tiny/export/") == before


@pytest.mark.slow
@pytest.mark.real_data
def test_tensorboard_command_follows_a_gcs_workdir(gcs_run):
    bucket, env, *_ = gcs_run
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "job", "tensorboard", f"gs://{bucket}/runs/tiny", "--port", str(port),
                              "--every", "5"], cwd=REPO, env=job_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        tags = http_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", deadline)
        while "finetune/loss" not in tags.get("train", {}) and time.monotonic() < deadline:
            tags = http_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", deadline)
        assert "finetune/loss" in tags["train"] and "finetune/accuracy" in tags["validation"]
        runs = http_json(f"http://127.0.0.1:{port}/data/plugin/profile/runs", deadline)
        assert any(r.startswith("train/") for r in runs), runs
    finally:
        board.terminate()
        board.wait(timeout=60)


@pytest.mark.real_data
def test_a_missing_gcs_bucket_is_one_line_and_writes_nothing(gcs_env, real_env):
    result = run_job("train", "configs/tiny.yaml", *tiny(), "workdir=gs://no-such-bucket/run", env={**gcs_env.env, **real_env})
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == ("error: workdir='gs://no-such-bucket/run': bucket 'no-such-bucket' does not "
                                     "exist (or is not visible with these credentials)")

def test_a_local_workdir_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    """filelock underneath: a second lock on the same workdir, even in this process, is refused
    with the holder's pid; released, the workdir can be locked again (the file naming the pid stays)."""
    from job.errors import WorkdirError

    with WorkdirLock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
        with pytest.raises(WorkdirBusy, match=rf"in use by a live run \(pid {os.getpid()}\)"):
            with WorkdirLock(str(tmp_path)):
                pass
        assert (tmp_path / ".lock").read_text() == str(os.getpid())  # the refused one did not touch it
    (tmp_path / ".lock").write_text("12345678")  # a dead run's pid
    with WorkdirLock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert (tmp_path / ".lock").is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match="cannot create or write it"):
        with WorkdirLock(str(tmp_path / "file" / "run")):  # a file where a directory should be
            pass


@pytest.mark.slow
@pytest.mark.real_data
def test_a_dataset_in_gcs_is_read_through_the_emulator(gcs_env, real_env, tmp_path):
    """data.data_dir=gs://...: the prepared CIFAR-10 folder, uploaded to the GCS server, is read in
    place through job.storage (TensorFlow's gs:// cannot reach an emulator)."""
    from job.storage import filesystem

    bucket = gcs_env.bucket()
    store, root = filesystem(f"gs://{bucket}/tfds")
    for path in sorted((DATASETS / "cifar10").rglob("*")):
        if path.is_file():
            with open(path, "rb") as source, store.open_output_stream(f"{root}/{path.relative_to(DATASETS)}") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
    cache = tmp_path / "cache"
    result = run_job("train", "configs/tiny.yaml", *tiny(), f"data.data_dir=gs://{bucket}/tfds",
                     f"workdir={tmp_path / 'run'}", env={**gcs_env.env, "KERAS_HOME": str(KERAS_HOME),
                                                          "JOB_CACHE_DIR": str(cache), "TFDS_DATA_DIR": "/nonexistent"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 16
    # Read in place: only the metadata was copied to the node; the record file passed through
    # scratch (job.shards.Fetcher), which is gone after the run.
    assert sorted(p.name for p in (cache / "tfds").rglob("*.json")) == ["dataset_info.json", "features.json"]
    assert not list(cache.rglob("*.tfrecord*"))


def _frozen_run(s3, bucket, tmp_path, holds: str, *extra: str):
    from tests.ray_helpers import start_job

    env = {**s3.env, "TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME), "RAY_ADDRESS": "",
           "JOB_TEST_HOLD_STEPS": holds, "JOB_TEST_HOLD_DIR": str(tmp_path)}
    args = ["train", "configs/tiny.yaml", *tiny(), "storage.outage_timeout_s=600", *extra, f"workdir=s3://{bucket}/run"]
    return start_job(args, env, tmp_path / "job.log")


@contextlib.contextmanager
def _store_frozen_after_step_4(s3, bucket, prefix, job, tmp_path):
    """Once the run holds at step 4 and ckpt-4 is complete in the bucket: the store frozen
    (SIGSTOP to moto_server) and the run let go. Yields thaw(); thawed and the run ended on exit."""
    from tests.ray_helpers import wait_for

    frozen = False

    def thaw():
        nonlocal frozen
        if frozen:
            os.kill(s3.process.pid, signal.SIGCONT)
            frozen = False

    try:
        _hold_until(tmp_path / "held-4", job, "step 4")
        wait_for(lambda: _index_names(s3, bucket, f"{prefix}/checkpoints/checkpoint") == "ckpt-4", 120,
                 "ckpt-4 complete in the bucket", interval=0.1, alive=lambda: job.poll() is None)
        os.kill(s3.process.pid, signal.SIGSTOP)
        frozen = True
        (tmp_path / "go-4").touch()
        yield thaw
    finally:
        thaw()
        if job.poll() is None:
            job.kill()


@pytest.mark.real_data
def test_a_store_frozen_over_two_checkpoints_is_ridden_out_and_every_checkpoint_lands_whole(s3_run):
    """s3_run's first run, its store frozen from step 4 to step 12: training went on meanwhile
    (the fixture saw step 12 with the store frozen), the run finished, and every checkpoint
    the bucket's index lists is complete and reads back."""
    _, _, first, _, _, _, read_back = s3_run
    saved = [int(s) for s in re.findall(r"checkpoint of step (\d+) saved, uploading to", first.stderr)]
    assert saved == [4, 8, 12, 16], first.stderr[-4000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["step"] == 16
    assert read_back == {"ckpt-8": 8, "ckpt-12": 12, "ckpt-16": 16}


@pytest.mark.slow
@pytest.mark.real_data
def test_a_store_away_past_the_bound_ends_the_run_naming_the_last_safe_checkpoint(s3_env, tmp_path):
    """Frozen once ckpt-4 is in the bucket and never thawed during the run: with
    storage.outage_timeout_s=3 the run ends with one line naming the store and ckpt-4, exit 75;
    once the store is back, ckpt-4 is complete there and reads back."""
    if not (DATASETS / "cifar10").is_dir() or not WEIGHTS.is_file():
        pytest.skip("offline CIFAR-10 and weights not found")
    bucket = s3_env.bucket()
    job = _frozen_run(s3_env, bucket, tmp_path, "4", "storage.outage_timeout_s=3")
    with _store_frozen_after_step_4(s3_env, bucket, "run", job, tmp_path):
        status = job.wait(timeout=600)
    log = (tmp_path / "job.log").read_text()
    print(log.strip().splitlines()[-1])  # shown with -s
    assert status == 75, log[-5000:]
    assert re.fullmatch(rf"error: the workdir's store s3://{bucket}/run has not answered for 3s "
                        rf"\(storage\.outage_timeout_s; [^)]*\); the last checkpoint safe in it is "
                        rf"s3://{bucket}/run/checkpoints/ckpt-4: rerun the same command to resume from it once the "
                        r"store is back", log.strip().splitlines()[-1]), log[-3000:]
    assert "Traceback" not in log
    assert _store_checkpoints_read_back(s3_env, bucket, "run") == {"ckpt-4": 4}


def test_s3_lease_writes_are_conditional_so_one_of_two_simultaneous_claims_wins(s3_env):
    """The same moment, made deterministic: two runs that both find the workdir free, or both
    read the same stale lease, each write theirs under a precondition on what they saw; the
    store (S3 If-None-Match / If-Match, which moto_server honours) accepts exactly one."""
    from job.storage import LeaseTaken

    bucket = s3_env.bucket()
    first, second = RemoteLease(Workdir.open(f"s3://{bucket}/run")), RemoteLease(Workdir.open(f"s3://{bucket}/run"))
    assert first.conditional
    first._put(IfNoneMatch="*")  # both saw no lease; the first write creates it...
    with pytest.raises(LeaseTaken):
        second._put(IfNoneMatch="*")  # ...the second is refused
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first.record["pid"] = dead.pid
    first._write()  # now a dead run's lease: both contenders read it, with its ETag
    (_, etag), (_, same) = first._get(), second._get()
    third = RemoteLease(Workdir.open(f"s3://{bucket}/run"))
    assert etag == same and third._put(IfMatch=etag)
    with pytest.raises(LeaseTaken):
        second._put(IfMatch=same)
    with pytest.raises(WorkdirBusy, match=rf"in use by run {third.record['run']}"):
        second.__enter__()  # and the loser's claim names the winner
