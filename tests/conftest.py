"""Shared fixtures: the offline data and weights in ../shared, and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
DATASETS, KERAS_HOME = SHARED / "datasets", SHARED / "keras"
WEIGHTS = KERAS_HOME / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

# The cheapest run: a few steps of each phase on 256 real images at 32 px, random weights,
# MobileNetV2 alpha 0.35 (5 MB checkpoints), a checkpoint every 4 steps. Every test starts
# from it (through `tiny`) and changes only what it is about.
TINY = [
    "data.train_split=train[:256]",
    "data.val_split=train[49872:]",
    "model.image_size=32",
    "model.alpha=0.35",
    "model.weights=none",
    "train.batch_size=32",
    "train.head.epochs=1",
    "train.finetune.epochs=1",
    "checkpoint.every_steps=4",
    "telemetry.log_every_steps=2",
    "telemetry.profile_steps=null",
    "telemetry.progress_bar=false",
]
# The real ImageNet weights, at 64 px so that they matter (at 32 px the last feature map is 1x1).
REAL_WEIGHTS = ["model.image_size=64", "model.alpha=1.0", "model.weights=imagenet"]
# Under tfds.testing.mock_data: random images in every split, nothing read from disk.
MOCK = ["data.data_dir=/nonexistent/tfds", "data.train_split=train", "data.val_split=validation",
        "train.batch_size=8", "model.dropout=0.0", "telemetry.log_every_steps=1"]


def tiny(*overrides: str) -> list[str]:
    """TINY with `overrides` (key=value strings, or lists of them) replacing the settings they name."""
    merged = {item.partition("=")[0]: item for item in TINY}
    for override in overrides:
        for item in [override] if isinstance(override, str) else override:
            merged[item.partition("=")[0]] = item
    return list(merged.values())


@pytest.fixture
def real_env(monkeypatch):
    """Point TFDS and Keras at ../shared; skip where this checkout has no ../shared."""
    if not (DATASETS / "cifar10").is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"offline CIFAR-10 and weights not found under {SHARED}")
    monkeypatch.setenv("TFDS_DATA_DIR", str(DATASETS))
    monkeypatch.setenv("KERAS_HOME", str(KERAS_HOME))
    return {"TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME)}


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_job(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m job ARGS` in a subprocess, as a user runs it; output captured as text."""
    result = subprocess.run(
        [sys.executable, "-m", "job", *args], cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
