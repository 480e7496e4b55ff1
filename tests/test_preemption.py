"""Preemption and changing worker counts, for real: SIGTERM to one Ray worker, to the Ray
driver, and to one process of a multi-worker run launched by hand; a run resumed on fewer
workers; a stopped worker (SIGSTOP); an error no retry can fix.

Evidence is read from what the job writes (summary.json, the replica records each worker
adds to the workdir at each checkpoint, the last line on stderr) and from Ray's state API, never from
Ray's log streaming.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from job.config import load_config
from job.errors import ConfigError
from tests.conftest import DATASETS, KERAS_HOME, WEIGHTS, run_job, tiny
from tests.ray_helpers import TINY_RAY, free_ports, local_replica_records, start_job, store_has_checkpoint, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.real_data]
# The scenarios (a Ray or hand-launched run of 16 or 32 steps, signalled, resumed) took 40-155 s
# each: marked slow, so `make test` skips them and `make test-all` (CI) runs them.

# 4 head steps (cached features), then 12 fine-tune steps at 64 px, one step per call: a
# signal sent once the head's checkpoint is complete lands while the first fine-tune step
# is still being traced, many steps before the end. No export at the end (export.after_train):
# these tests are about stopping and resuming; test_ray checks the export of a Ray run.
LONG = ["train.finetune.epochs=3", "model.image_size=64", "ray.enabled=true", "export.after_train=false"]
TOTAL_STEPS = 16


def _run_args(cluster, workdir, name: str, *extra: str) -> list[str]:
    return ["train", "configs/tiny.yaml", *TINY_RAY, *LONG, f"ray.name={name}", f"ray.address={cluster.gcs_address}",
            f"workdir={workdir}", *extra]


def _first_checkpoint(workdir, job) -> dict:
    """Wait until a checkpoint is complete in the workdir and both ranks have recorded it; their records, by rank."""
    wait_for(lambda: store_has_checkpoint(workdir) and {r["rank"] for r in local_replica_records(workdir)} == {0, 1},
             400, "the first checkpoint", interval=0.2, alive=lambda: job.poll() is None)
    return {r["rank"]: r for r in local_replica_records(workdir)}


@pytest.mark.slow
def test_sigterm_to_one_worker_saves_once_collectively_and_the_run_completes(cluster, tmp_path):
    workdir = tmp_path / "run"
    job = start_job(_run_args(cluster, workdir, "worker-sigterm"), cluster.env, tmp_path / "job.log")
    try:
        first = _first_checkpoint(workdir, job)
        os.kill(first[1]["pid"], signal.SIGTERM)
        assert job.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
    records = local_replica_records(workdir)
    stops = {r["step"] for r in records if r["stopped"]}
    assert len(stops) == 1, records  # one collective save...
    stop_step = stops.pop()
    stopped = [r for r in records if r["step"] == stop_step]
    assert sorted(r["rank"] for r in stopped) == [0, 1] and len({r["weights_sha256"] for r in stopped}) == 1
    assert all(r["stopped"] == "a SIGTERM to /job:worker/task:1" for r in stopped)  # ...agreed by both ranks
    assert first[0]["step"] < stop_step < TOTAL_STEPS
    resumed = [r for r in records if r["step"] > stop_step]
    assert resumed and all(r["restored_from"] == str(workdir / "checkpoints" / f"ckpt-{stop_step}") for r in resumed), records
    assert first[1]["pid"] not in {r["pid"] for r in resumed}
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("finished", TOTAL_STEPS)  # as if never stopped
    assert not (workdir / "export").exists() and summary["export"] is None  # export.after_train=false


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_and_a_rerun_on_one_worker_finishes_the_same_run(cluster, tmp_path):
    workdir = tmp_path / "run"
    args = _run_args(cluster, workdir, "driver-sigterm")
    job = start_job(args, cluster.env, tmp_path / "job.log")
    try:
        _first_checkpoint(workdir, job)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
    last = (tmp_path / "job.log").read_text().strip().splitlines()[-1]
    match = re.fullmatch(r"stopped by signal 15 to the driver at step (\d+); checkpoint (\S+); "
                         r"rerun the same command to resume", last)
    assert match, last
    step = int(match[1])
    assert match[2] == str(workdir / "checkpoints" / f"ckpt-{step}") and 4 <= step < TOTAL_STEPS
    assert json.loads((workdir / "summary.json").read_text())["status"] == "preempted"

    # The same command on one worker: the global batch (train.batch_size=32) stays, so the
    # data position and the schedule do too; it ends where an uninterrupted run ends.
    result = run_job(*args, "ray.num_workers=1", env=cluster.env, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["replicas"], summary["global_batch"]) == \
        ("finished", TOTAL_STEPS, 1, 32)
    assert summary["images_seen"] == TOTAL_STEPS * 32
    rerun = [r for r in local_replica_records(workdir) if r["step"] > step]
    assert rerun and {r["rank"] for r in rerun} == {0}
    assert all(r["restored_from"].endswith(f"ckpt-{step}") for r in rerun)


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_hand_launched_multi_worker_run(tmp_path):
    """Two `python -m job train` processes with TF_CONFIG, no Ray: a SIGTERM to worker 1 makes
    both save at the same step and exit 0; the same two commands again finish the run."""
    if not (DATASETS / "cifar10").is_dir() or not WEIGHTS.is_file():
        pytest.skip("offline CIFAR-10 and weights not found")
    workdir = tmp_path / "run"
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = ["train", "configs/tiny.yaml", *tiny("train.finetune.epochs=3", "model.image_size=64", "train.batch_size=32",
                                                 "export.after_train=false"), f"workdir={workdir}"]

    def launch(index: int, log_name: str) -> subprocess.Popen:
        env = {"TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        return start_job(args, env, tmp_path / log_name)

    workers = [launch(0, "w0.log"), launch(1, "w1.log")]
    try:
        wait_for(lambda: (workdir / "checkpoints" / "ckpt-4.index").is_file(), 400, "the head phase's checkpoint",
                 interval=0.2, alive=lambda: all(w.poll() is None for w in workers))
        workers[1].send_signal(signal.SIGTERM)
        assert [w.wait(timeout=300) for w in workers] == [0, 0], (tmp_path / "w1.log").read_text()[-4000:]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    lines = [(tmp_path / f"w{i}.log").read_text().strip().splitlines()[-1] for i in (0, 1)]
    chief = re.fullmatch(r"stopped by another worker's stop request at step (\d+); checkpoint (\S+); .*", lines[0])
    signalled = re.fullmatch(r"stopped by signal 15 at step (\d+); checkpoint \S+; .*", lines[1])
    assert chief and signalled and chief[1] == signalled[1], lines
    step = int(chief[1])
    assert chief[2] == str(workdir / "checkpoints" / f"ckpt-{step}") and (workdir / "checkpoints" / f"ckpt-{step}.index").is_file()

    workers = [launch(0, "r0.log"), launch(1, "r1.log")]
    assert [w.wait(timeout=600) for w in workers] == [0, 0], (tmp_path / "r0.log").read_text()[-4000:]
    assert f"resumed from {workdir / 'checkpoints' / f'ckpt-{step}'} at step {step}" in (tmp_path / "r0.log").read_text()
    summary = json.loads((workdir / "summary.json").read_text())
    # 256 images at a global batch of 32: 8 head steps and 24 fine-tune steps, as if never stopped.
    assert (summary["status"], summary["step"], summary["replicas"]) == ("finished", 32, 2)
    assert not (workdir / "export").exists()  # export.after_train=false


@pytest.mark.slow
def test_a_non_finite_loss_on_ray_ends_the_run_on_its_first_attempt(cluster, tmp_path):
    """A JobError inside the workers (here a non-finite loss) is not retried: ray.max_failures=2
    would otherwise start the worker group 3 times."""
    before = cluster.actors("RayTrainWorker")
    result = run_job(*_run_args(cluster, tmp_path / "run", "non-finite", "ray.max_failures=2",
                                "train.finetune.learning_rate=1e38"), env=cluster.env, timeout=600)
    assert result.returncode == 1, result.stderr[-6000:]
    assert re.fullmatch(r"error: non-finite (loss|weights) in phase finetune (at|after) step \d+; stopped without "
                        r"saving, last good checkpoint: \S+", result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
    assert cluster.actors("RayTrainWorker") - before == 2  # one worker group of 2: a single attempt


@pytest.mark.slow
def test_a_stopped_worker_ends_the_attempt_and_ray_resumes_from_the_last_checkpoint(cluster, tmp_path):
    """SIGSTOP to rank 1: it neither dies nor answers. Within ray.hang_timeout_s the attempt
    ends (TF's collective and Ray Train's barrier and health check), Ray starts a new group
    that resumes from the last checkpoint, and the run completes."""
    workdir = tmp_path / "run"
    job = start_job(_run_args(cluster, workdir, "stopped", "ray.hang_timeout_s=20"), cluster.env, tmp_path / "job.log")
    stopped_pid = None
    try:
        first = _first_checkpoint(workdir, job)
        stopped_pid = first[1]["pid"]
        os.kill(stopped_pid, signal.SIGSTOP)
        assert job.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
        if stopped_pid:
            try:
                os.kill(stopped_pid, signal.SIGCONT)  # Ray has killed it by now; else let it go
            except ProcessLookupError:
                pass
    records = local_replica_records(workdir)
    retried = [r for r in records if r["pid"] not in (first[0]["pid"], stopped_pid)]
    assert {r["rank"] for r in retried} == {0, 1}, records
    assert all(re.search(r"/checkpoints/ckpt-\d+$", r["restored_from"] or "") for r in retried), retried
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("finished", TOTAL_STEPS)


@pytest.mark.parametrize("workers, batch, error", [
    ("[1,3]", 32, "train.batch_size=32: must be divisible by the 3 replicas in sync"),
    ("[1,2]", 32, None),
])
def test_every_worker_count_of_an_elastic_run_must_split_the_global_batch(workers, batch, error):
    from job.launch import check_global_batch, scaling_config

    config = load_config(None, ["ray.enabled=true", f"ray.num_workers={workers}", f"train.batch_size={batch}"])
    assert scaling_config(config.ray).num_workers == tuple(json.loads(workers))
    if error:
        with pytest.raises(ConfigError, match=re.escape(error)):
            check_global_batch(config)
    else:
        assert check_global_batch(config) == batch


def test_a_range_of_workers_with_a_per_replica_batch_is_refused():
    with pytest.raises(ConfigError, match=r"ray.num_workers=\[1, 2\] changes the number of replicas"):
        load_config(None, ["ray.enabled=true", "ray.num_workers=[1,2]", "train.per_replica_batch_size=16"])
