"""The job on Ray, for real, on 127.0.0.1: an embedded 2-worker run whose replicas agree, a
`ray job submit` to a two-node cluster started with `ray start`, a SIGKILLed worker that Ray
replaces and that resumes from the last checkpoint, and the cluster/ configs checked by
Ray's own validator.

The two-node cluster is the session's (tests.conftest.cluster, tests.ray_helpers.LocalCluster).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import yaml

from tests.conftest import EXPORTS, REPO, run_job

from job.profile import step_summary
from tests.ray_helpers import (TINY_RAY, digests, local_replica_records, replica_records, s3_store_has_checkpoint,
                               store_has_checkpoint, wait_for)


@pytest.mark.ray
def test_bad_input_on_ray_fails_once_before_any_worker_starts(tmp_path):
    """A data error is checked in one task on a worker's node: exit 2 with one line, no worker
    group started and none restarted (Ray Train would retry it ray.max_failures times)."""
    workdir = tmp_path / "run"
    result = run_job("train", "configs/tiny.yaml", *TINY_RAY, "ray.enabled=true", "ray.max_failures=2",
                     "data.name=no_such_dataset", f"workdir={workdir}", env={"RAY_ADDRESS": ""}, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert result.stderr.splitlines()[-1] == ("error: data.name='no_such_dataset': no such TFDS dataset "
                                              "(see tfds.list_builders())"), output[-4000:]
    assert "Traceback" not in result.stderr
    assert "TensorflowTrainer" not in output and "FailurePolicy" not in output, output[-4000:]
    assert not workdir.exists()  # nothing is written before the inputs are checked


@pytest.mark.ray
def test_verbose_brings_back_what_tensorflow_and_ray_print(tmp_path):
    """telemetry.verbose=true: TensorFlow's native start-up lines, which the console leaves out
    by default (the bad-input test above sees one line), are back."""
    result = run_job("train", "configs/tiny.yaml", *TINY_RAY, "ray.enabled=true", "telemetry.verbose=true",
                     "data.name=no_such_dataset", f"workdir={tmp_path / 'run'}", env={"RAY_ADDRESS": ""}, timeout=300)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "oneDNN custom operations are on" in result.stderr, result.stderr[-4000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.name='no_such_dataset'")


@pytest.mark.ray
@pytest.mark.real_data
@pytest.mark.slow
def test_two_local_workers_agree_and_report(tmp_path, real_env):
    """Embedded local Ray, 2 workers: same weights on both after every epoch, metrics and a
    checkpoint reported each epoch, only the chief writes the workdir, every worker profiled,
    and a console a person can read."""
    workdir = tmp_path / "run"
    result = run_job("train", "configs/tiny.yaml", *TINY_RAY, EXPORTS, "ray.enabled=true", f"workdir={workdir}",
                     "telemetry.profile_steps=[1,3]", "telemetry.profile_phase=finetune",
                     "telemetry.profile_all_workers=true", "telemetry.progress_bar=true", "telemetry.progress_every_s=0",
                     env={"RAY_ADDRESS": ""},
                     timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 8

    # The console: the chief's lines once each, through the driver (job.ray_control), and none
    # of the workers' own output (TensorFlow's native start-up lines, Ray Train's report dumps).
    for noise in ("oneDNN", "cuda", "absl::InitializeLog", "TrainingReport(", "PlacementGroupCleaner",
                  "(RayTrainWorker", "Traceback"):
        assert noise not in output, (noise, output[-6000:])
    for line in ("phase head: steps 0..4", "phase finetune: steps 0..4", "validation head step 4: accuracy",
                 "validation finetune step 8: accuracy", f"checkpoint of step 8 saved in {workdir / 'checkpoints'}"):
        assert output.count(line) == 1, (line, output[-6000:])
    assert re.search(r"finetune step 4/4 \(100%\), \d+ img/s, loss \d\.\d+, \d+s left", output), output[-6000:]
    print(result.stderr)  # shown with -s: the console

    by_step = digests(workdir)
    assert sorted(by_step) == [4, 8], by_step  # one checkpointed report per epoch: head, finetune
    for step, by_rank in by_step.items():
        assert sorted(by_rank) == [0, 1] and by_rank[0] == by_rank[1], (step, by_rank)
    assert by_step[4][0] != by_step[8][0]  # and they did train

    summary = json.loads((workdir / "summary.json").read_text())
    # Each worker's thread pools follow its CPU share (ray.cpus_per_worker=1), not the host's cores.
    threads = summary["threads"]
    assert (threads["intra_op"], threads["inter_op"], threads["tf_data"], threads["from"]) == (1, 2, 1, "ray.cpus_per_worker")
    assert "threads: 1 intra-op, 2 inter-op, 1 tf.data (ray.cpus_per_worker)" in output
    report = summary["ray"]["last_report"]
    assert report["step"] == 8 and report["phase"] == "finetune" and 0 <= report["val_accuracy"] <= 1
    assert report["weights_sha256"] == by_step[8][0]
    assert summary["ray"]["checkpoint"] == str(workdir / "checkpoints" / "ckpt-8")
    # One copy of each checkpoint: the workdir's; Ray's run directory holds none.
    assert store_has_checkpoint(workdir) == "ckpt-8" and not list((workdir / "ray").rglob("ckpt-*"))
    assert sorted(p.name for p in (workdir / "checkpoints").glob("*.index")) == ["ckpt-4.index", "ckpt-8.index"]
    assert (workdir / "export" / "model.keras").is_file()
    tensorboard = workdir / "tensorboard"
    assert sorted(p.name for p in tensorboard.iterdir()) == ["train", "validation", "worker_1"]
    for run in ("train", "worker_1"):  # each worker's trace shows its own steps
        traces = list((tensorboard / run / "plugins" / "profile").glob("*/*.xplane.pb"))
        assert len(traces) == 1
        summary = step_summary(traces[0])
        assert summary["steps"] >= 1 and summary["average_step_ms"] > 0 and not summary["no_step_marker"], summary


@pytest.mark.ray
@pytest.mark.real_data
@pytest.mark.slow
def test_job_submit_to_two_node_cluster(cluster, tmp_path):
    """cluster/submit.sh -> `ray job submit --working-dir .`: one worker on each node, the job
    succeeds, checkpoints land in the storage path and the export in the workdir."""
    workdir, storage = tmp_path / "run", tmp_path / "storage"
    submitted = subprocess.run(
        ["bash", "cluster/submit.sh", "configs/tiny.yaml", *TINY_RAY, EXPORTS, "ray.placement_strategy=STRICT_SPREAD",
         "ray.name=submitted", f"workdir={workdir}", f"ray.storage_path={storage}"],
        cwd=REPO, env={**cluster.env, "RAY_ADDRESS": cluster.address, "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=600)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-6000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-3000:]
    # STRICT_SPREAD: the two workers ran on two nodes (read from the replica records, not the console).
    records = local_replica_records(workdir)
    assert {r["rank"] for r in records} == {0, 1}, records
    assert len({r["node"] for r in records}) == 2, records
    assert store_has_checkpoint(workdir) == "ckpt-8" and (workdir / "checkpoints" / "ckpt-8.index").is_file()
    assert (storage / "submitted").is_dir() and not list(storage.rglob("ckpt-*"))  # Ray's run state only
    assert (workdir / "export" / "saved_model" / "saved_model.pb").is_file()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 8 and summary["ray"]["workers"] == 2


@pytest.mark.ray
@pytest.mark.real_data
@pytest.mark.slow
def test_killed_worker_resumes_from_the_bucket(cluster, s3, tmp_path):
    """2 workers into s3://, no shared filesystem: SIGKILL rank 1 once a checkpoint is complete in
    the bucket; Ray restarts the worker group, whose workers start from empty scratch of their
    own and restore that checkpoint from the bucket, and the job completes with every output
    there, each checkpoint stored once (under checkpoints/, none under Ray's run directory)."""
    bucket = s3.bucket()
    log_path = tmp_path / "job.log"
    # 3 head epochs: 8 more steps after the first checkpoint, time enough to kill a worker mid-run.
    args = ["train", "configs/tiny.yaml", *TINY_RAY, EXPORTS, "train.head.epochs=3", "ray.enabled=true", "ray.name=faulty",
            f"ray.address={cluster.head_ip}:{cluster.gcs}", f"workdir=s3://{bucket}/run"]
    with open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, "-m", "job", *args], cwd=REPO, env=cluster.env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        alive = lambda: job.poll() is None  # noqa: E731
        # Complete in the bucket (its index there names it), and rank 1's record of it uploaded.
        wait_for(lambda: s3_store_has_checkpoint(s3, bucket, "run") and
                 [r for r in replica_records(s3, bucket, "run") if r["rank"] == 1], 400,
                 "the first checkpoint in the bucket", alive=alive)
        first = [r for r in replica_records(s3, bucket, "run") if r["rank"] == 1][0]
        os.kill(first["pid"], signal.SIGKILL)
        job.wait(timeout=500)
    finally:
        if job.poll() is None:
            job.kill()
    output = log_path.read_text()
    assert job.returncode == 0, output[-6000:]
    summary = json.loads(s3.client().get_object(Bucket=bucket, Key="run/summary.json")["Body"].read())
    assert summary["step"] == 16 and summary["status"] == "finished"
    # The checkpoints after the kill were written by the restarted group.
    records = replica_records(s3, bucket, "run")
    retried = [r for r in records if r["pid"] != first["pid"] and r["step"] > first["step"]]
    assert sorted({r["rank"] for r in retried}) == [0, 1], records
    for record in retried:
        print(record)  # shown with -s: the evidence of the resume
        assert re.fullmatch(rf"s3://{bucket}/run/checkpoints/ckpt-\d+", record["restored_from"]), record
        assert record["scratch_was_empty"] and record["scratch"] != first["scratch"]
    assert len({r["scratch"] for r in retried}) == 2  # each worker its own
    keys = s3.keys(bucket, "run/")
    assert "run/export/model.keras" in keys and "run/checkpoints/ckpt-16.index" in keys
    assert any(k.startswith("run/tensorboard/validation/events.out.tfevents") for k in keys)
    # One copy of each checkpoint, from the listing: its files under checkpoints/ and nowhere else.
    checkpoint_files = [k for k in keys if re.search(r"/ckpt-\d+\.", k)]
    assert checkpoint_files and all(k.startswith("run/checkpoints/ckpt-") for k in checkpoint_files), keys
    indexes = [k for k in checkpoint_files if k.endswith(".index")]
    assert all(k.replace(".index", ".data-00000-of-00001") in keys for k in indexes), keys
    sizes = {o["Key"]: o["Size"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="run/ray/").get("Contents", [])}
    assert sum(sizes.values()) < 100_000, sizes  # Ray's run state: small files only


@pytest.mark.ray
@pytest.mark.real_data
@pytest.mark.slow
def test_job_submit_refuses_a_relative_workdir(cluster, tmp_path):
    """Under `ray job submit` a relative workdir would land in Ray's temporary copy of the
    working directory, which Ray deletes: refused with one line before any worker starts."""
    submitted = subprocess.run(
        ["bash", "cluster/submit.sh", "configs/tiny.yaml", *TINY_RAY, "ray.name=relative", "workdir=runs/relative"],
        cwd=REPO, env={**cluster.env, "RAY_ADDRESS": cluster.address, "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=600)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode != 0, output[-4000:]
    assert ("error: workdir='runs/relative' is a relative path and under `ray job submit` it would be inside Ray's "
            "temporary copy of the working directory: use an s3:// or gs:// URI, or an absolute path on storage "
            "every node mounts") in output, output[-4000:]
    assert "TensorflowTrainer" not in output


@pytest.mark.ray
def test_cluster_configs_are_valid():
    """cluster/ray-cluster.yaml passes Ray's own `ray up` validation; the RayJob's entrypoint is
    `python -m job train` with a config that exists and loads with its overrides."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    from job.__main__ import _parser
    from job.config import load_config

    cluster = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cluster))
    assert {"head", "gpu_worker"} <= set(cluster["available_node_types"])
    # Every node type names its image (Ray's own default is an Ubuntu 18.04 AMI past its end of
    # life), and no node pip-installs anything at start: the Docker image has it all.
    for node_type in cluster["available_node_types"].values():
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
    assert not any("pip install" in c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                                                   "initialization_commands") for c in cluster.get(key, []))
    assert cluster["docker"]["image"].endswith(":2.60.0-gpu") and "pip install" in (REPO / "cluster" / "Dockerfile").read_text()

    manifest = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    # KubeRay 1.2's RayJob fields only; a hung job is bounded; no volume claim that nothing fills.
    assert set(manifest["spec"]) <= {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                                     "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submissionMode",
                                     "jobId", "metadata", "suspend", "entrypointNumCpus", "entrypointNumGpus"}
    assert manifest["spec"]["activeDeadlineSeconds"] > 0 and "1.2" in (REPO / "cluster" / "rayjob.yaml").read_text()
    assert "persistentVolumeClaim" not in (REPO / "cluster" / "rayjob.yaml").read_text()
    spec = manifest["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 4  # one pod per node, all its GPUs
    yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "job", "train"]
    args = _parser().parse_args(argv[3:])
    assert (REPO / args.config).is_file()
    config = load_config(str(REPO / args.config), args.overrides)
    assert config.ray.enabled and config.ray.use_gpu and config.workdir.startswith("s3://")
    assert config.ray.gpus_per_worker == worker["resources"]["limits"]["nvidia.com/gpu"]

    assert subprocess.run(["bash", "-n", "cluster/submit.sh"], cwd=REPO).returncode == 0
    assert load_config(str(REPO / "configs" / "ray_local.yaml")).ray.enabled


def test_scaling_and_run_config_follow_the_settings(tmp_path, monkeypatch):
    """ray.* settings -> ScalingConfig (1 or N GPUs per worker) and RunConfig (name, storage,
    failures, retention)."""
    from job.config import load_config
    from job.errors import ConfigError
    from job.launch import run_config, scaling_config

    config = load_config(None, [f"workdir={tmp_path}", "ray.num_workers=2", "ray.use_gpu=true", "ray.gpus_per_worker=4",
                                "ray.cpus_per_worker=8", "ray.resources_per_worker={trainer: 1}", "ray.max_failures=5",
                                "ray.name=layout"])
    scaling = scaling_config(config.ray)
    assert scaling.num_workers == 2 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 8, "GPU": 4, "trainer": 1}
    run = run_config(config)
    assert run.name == "layout" and run.storage_path == str(tmp_path / "ray") and run.storage_filesystem is None
    assert run.failure_config.max_failures == 5
    # A URI goes through the job's own filesystem (bounded requests; the GCS emulator too).
    monkeypatch.setenv("AWS_REGION", "us-east-1")  # else the bucket's region is asked of AWS
    remote = run_config(load_config(None, ["workdir=s3://some-bucket/run", "ray.name=layout"]))
    assert remote.storage_path == "some-bucket/run/ray" and type(remote.storage_filesystem).__name__ == "S3FileSystem"
    with pytest.raises(ConfigError, match=r"^ray.keep_checkpoints is no longer a setting: each checkpoint is stored "
                                          r"once, in <workdir>/checkpoints"):
        load_config(None, ["ray.keep_checkpoints=3"])
    cpu = scaling_config(load_config(None, ["ray.cpus_per_worker=0.5"]).ray)
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 0.5}


def test_a_local_workdir_the_driver_does_not_share_is_said_before_training(tmp_path, caplog):
    """A worker that does not see the lock file the driver holds in a local-path workdir (a path
    on another node's disk, not a shared mount) says so in one line; one that sees it says nothing."""
    from job.launch import _unshared_path_warning
    from job.storage import Workdir

    (tmp_path / ".lock").write_text("4242")
    workdir = Workdir.open(str(tmp_path))
    with caplog.at_level("WARNING", logger="job.launch"):
        _unshared_path_warning(workdir, "4242", rank=1)
        assert not caplog.records
        _unshared_path_warning(workdir, "777", rank=1)
    line = (f"workdir={str(tmp_path)!r} is a local path this node does not share with the driver's: checkpoints "
            "written here are invisible to a worker restarted on another node and to the driver's export; use an "
            "s3:// or gs:// URI or a path every node mounts (rank 1)")
    assert [r.getMessage() for r in caplog.records] == [line]
    _unshared_path_warning(Workdir.open("s3://b/run"), None, rank=1)  # a URI: nothing to check
