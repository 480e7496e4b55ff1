"""GPU paths checked on a CPU machine: fail fast without GPUs, thread pools sized to a worker's
share, one collective per step, a learning-rate rule that holds at 8-16 GPUs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from job.config import load_config
from job.step import Phase, global_batch_size, learning_rate_scale, make_optimizer
from tests.conftest import REPO, job_env, run_job, tiny

CIFAR_TRAIN = 45_000  # train[:90%]


@pytest.mark.parametrize("replicas, peak, warmup_steps", [(1, 1e-4, 352), (8, 1e-4 * math.sqrt(8), 44),
                                                          (16, 4e-4, 22)])
def test_the_gpu_recipe_scales_its_learning_rate_with_the_square_root_of_the_batch(replicas, peak, warmup_steps):
    """configs/cifar10_full.yaml: 64 images per replica, AdamW 1e-4 for a global batch of 64,
    warmup 0.5 epochs: on 8 and 16 GPUs the peak is 2.8x and 4x (linear scaling would make it
    8x and 16x), reached after the same half epoch of images."""
    config = load_config(str(REPO / "configs" / "cifar10_full.yaml"))
    batch = global_batch_size(config.train, replicas)
    steps_per_epoch = CIFAR_TRAIN // batch
    phase = Phase("finetune", config.train.finetune, 0, int(config.train.finetune.epochs * steps_per_epoch), steps_per_epoch)
    optimizer = make_optimizer(phase, steps_per_epoch, learning_rate_scale(config.train, batch), "float32")
    schedule = optimizer.inner_optimizer._learning_rate if hasattr(optimizer, "inner_optimizer") else optimizer._learning_rate
    assert batch == 64 * replicas
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup_steps)) == pytest.approx(peak, rel=1e-5)  # the peak, after 0.5 epochs
    assert float(schedule(warmup_steps - 1)) < peak
    assert float(schedule(phase.steps)) == pytest.approx(0.0, abs=1e-9)


def test_one_collective_per_train_step_under_multi_worker_mirrored():
    """Two workers on loopback: gradients, loss, accuracy, the loss scaler's finite check and
    the stop vote all ride on one all-reduce per step."""
    for precision in ("float32", "mixed_float16"):
        result = subprocess.run([sys.executable, "benchmarks/count_collectives.py", precision, "--steps", "5"], cwd=REPO,
                                env=job_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
        assert report["collectives_run_per_step"] == 1 and report["collective_ops_in_step_graph"] == 1, report


@pytest.mark.real_data
def test_the_gpu_recipe_on_a_cpu_machine_is_refused_unless_asked(real_env, tmp_path):
    small = tiny("train.per_replica_batch_size=32", "train.precision=float32")
    result = run_job("train", "configs/cifar10_full.yaml", *small, f"workdir={tmp_path / 'gpu'}", env=real_env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.require_gpu=true but TensorFlow sees no GPU here (no GPU, or CUDA did not load: pip install -e "
        "'.[gpu]'); set train.require_gpu=false to run on the CPU")
    assert not (tmp_path / "gpu").exists()
    result = run_job("train", "configs/cifar10_full.yaml", *small, "train.require_gpu=false", "train.finetune.epochs=0.25",
                     "export.after_train=false", f"workdir={tmp_path / 'cpu'}", env=real_env, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished"
    assert "devices: /device:CPU:0 (_DefaultDistributionStrategy, 1 replicas)" in result.stderr


@pytest.mark.ray
@pytest.mark.real_data
def test_ray_use_gpu_without_gpus_is_one_line_in_seconds(real_env, tmp_path):
    started = time.monotonic()
    result = run_job("train", "configs/tiny.yaml", *tiny(), "ray.enabled=true", "ray.num_workers=1", "ray.use_gpu=true",
                     f"workdir={tmp_path / 'run'}", env={**real_env, "RAY_ADDRESS": ""}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ray.use_gpu=true: the run needs 1 GPUs (ray.num_workers=1 x ray.gpus_per_worker=1) and the Ray this "
        "job started on this machine has 0")
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()
