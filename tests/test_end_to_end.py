"""End to end on a small slice of the real CIFAR-10 with the real ImageNet weights.

One run (module fixture) is checked from every side: checkpoints, TensorBoard events, the
profiler trace, the exported model, `evaluate`, and a real `tensorboard` process serving
its scalars and profile over HTTP on loopback. Then kill-and-resume.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (DATASETS, EXPORTS, KERAS_HOME, REAL_WEIGHTS, REPO, WEIGHTS, free_port, http_json, job_env, run_job,
                            tiny)

pytestmark = pytest.mark.real_data
REAL = {"TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME)}
# The real weights, a few steps of each phase, a profile of steps 1-2 of the fine-tune phase.
TINY_REAL = tiny(REAL_WEIGHTS, "telemetry.profile_steps=[1,3]", EXPORTS)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    if not WEIGHTS.is_file() or not (DATASETS / "cifar10").is_dir():
        pytest.skip("offline CIFAR-10 and weights not found next to this checkout")
    workdir = tmp_path_factory.mktemp("e2e")
    result = run_job("train", "configs/tiny.yaml", f"workdir={workdir}", *TINY_REAL, env=REAL, check=True)
    return workdir, result


def test_run_finishes_with_checkpoint_summary_and_config(finished_run):
    workdir, result = finished_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == summary["total_steps"] == 16
    assert [r["phase"] for r in summary["validation_history"]] == ["head", "finetune"]
    assert 0.0 <= summary["final_val_accuracy"] <= 1.0
    assert (workdir / "checkpoints" / "ckpt-16.index").is_file()
    assert "model:" in (workdir / "config.yaml").read_text()
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "finished"


def test_tensorboard_events_and_profile_trace_are_written(finished_run):
    workdir, _ = finished_run
    assert list((workdir / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((workdir / "tensorboard" / "validation").glob("events.out.tfevents.*"))
    traces = list((workdir / "tensorboard" / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 10_000


def test_the_profile_tab_shows_each_traced_step(finished_run):
    """What TensorBoard's overview page and input-pipeline analyzer make of the trace (the profile
    plugin's own converter): the two traced fine-tune steps (profile_steps [1, 3) = global steps
    9 and 10), each under its own step marker, with a step time; no "No step marker" warning."""
    from job.profile import step_summary, traces

    (trace,) = traces(str(finished_run[0] / "tensorboard" / "train"))
    for tool in ("overview_page", "input_pipeline_analyzer"):
        summary = step_summary(trace, tool)
        assert not summary["no_step_marker"], (tool, summary)
        assert summary["step_names"] == ["train 9", "train 10"] and summary["average_step_ms"] > 0, (tool, summary)
        assert 0 <= summary["input_percent"] < 100


def test_exported_model_serves_raw_uint8_images(finished_run):
    workdir, _ = finished_run
    import keras
    import tensorflow as tf

    import job.export  # noqa: F401 - registers the serving model's preprocessing layer

    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    model = keras.models.load_model(workdir / "export" / "model.keras")
    probabilities = np.asarray(model(images))
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    saved = tf.saved_model.load(str(workdir / "export" / "saved_model"))
    np.testing.assert_allclose(saved.serve(tf.constant(images)).numpy(), probabilities, rtol=1e-4, atol=1e-5)


def test_evaluate_command_reads_the_checkpoint(finished_run):
    workdir, _ = finished_run
    result = run_job("evaluate", "configs/tiny.yaml", f"workdir={workdir}", *TINY_REAL,
                     "data.eval_split=train[49872:]", env=REAL, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads((workdir / "summary.json").read_text())
    assert report["examples"] == 128
    # The same weights on the same images: the accuracy the run reported at its end.
    assert report["accuracy"] == pytest.approx(summary["final_val_accuracy"], abs=1e-6)


def test_tensorboard_serves_scalars_and_profile_over_http(finished_run):
    workdir, _ = finished_run
    port = free_port()
    board = subprocess.Popen(
        [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(workdir / "tensorboard"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=job_env(),
    )
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline = time.monotonic() + 120
        tags = http_json(f"{base}/plugin/scalars/tags", deadline)
        while "finetune/loss" not in tags.get("train", {}) and time.monotonic() < deadline:
            tags = http_json(f"{base}/plugin/scalars/tags", deadline)  # first scan of the logdir
        for tag in ("loss", "accuracy", "learning_rate", "images_per_sec", "step_time_ms"):
            assert f"finetune/{tag}" in tags["train"] and f"head/{tag}" in tags["train"]
        assert {"head/accuracy", "finetune/accuracy"} <= set(tags["validation"])
        points = http_json(f"{base}/plugin/scalars/scalars?run=train&tag=finetune/loss", deadline)
        assert points and all(np.isfinite(p[2]) for p in points)

        runs = http_json(f"{base}/plugin/profile/runs", deadline)
        profile_runs = [r for r in runs if r.startswith("train/")]
        assert profile_runs, runs
        tools = http_json(f"{base}/plugin/profile/run_tools?run={profile_runs[0]}", deadline)
        assert any(t.startswith("trace_viewer") for t in tools) and "overview_page" in tools
        from job.profile import summarize

        for tool in ("overview_page", "input_pipeline_analyzer"):  # the data the Profile tab draws
            page = summarize(http_json(f"{base}/plugin/profile/data?run={profile_runs[0]}&tag={tool}", deadline))
            assert page["steps"] == 2 and page["average_step_ms"] > 0 and not page["no_step_marker"], (tool, page)
    finally:
        board.terminate()
        board.wait(timeout=30)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)  # polling interval, not synchronisation


def _latest_step(workdir: Path) -> int:
    state = workdir / "checkpoints" / "checkpoint"
    if not state.is_file():
        return -1
    match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state.read_text(), re.M)
    return int(match.group(1)) if match else -1


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    if not WEIGHTS.is_file():
        pytest.skip("offline weights not found")
    args = [sys.executable, "-m", "job", "train", "configs/tiny.yaml", f"workdir={tmp_path}", *TINY_REAL,
            "checkpoint.every_steps=2", "telemetry.profile_steps=null"]
    victim = subprocess.Popen(args, cwd=REPO, env=job_env(REAL), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it once a checkpoint inside the fine-tune phase (global step > 8 of 16) is complete,
        # i.e. named in the manager's state file (its data files are written before).
        _wait_for(lambda: _latest_step(tmp_path) >= 10 or victim.poll() is not None, 600, "no checkpoint past step 10")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    steps_at_kill = _latest_step(tmp_path)
    assert 10 <= steps_at_kill < 16, "the run finished before it could be killed"

    resumed = subprocess.run(args, cwd=REPO, env=job_env(REAL), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/ckpt-{steps_at_kill} at step {steps_at_kill}" in resumed.stderr
    assert "phase finetune: steps %d..8 " % (steps_at_kill - 8) in resumed.stderr
    assert "phase head" not in resumed.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 16 and summary["status"] == "finished"


@pytest.mark.slow
def test_the_quick_recipe_runs_on_a_slice(tmp_path):
    """configs/cifar10_quick.yaml, what `make train` runs, on 1,000 images: cached activations
    of the frozen bottom, a head on the first third of them (2 steps of 128 an epoch), the
    sharpened upscaling, flip test-time augmentation in validation and in the export."""
    if not WEIGHTS.is_file() or not (DATASETS / "cifar10").is_dir():
        pytest.skip("offline CIFAR-10 and weights not found next to this checkout")
    run_job("train", "configs/cifar10_quick.yaml", f"workdir={tmp_path}", "data.train_split=train[:1000]",
            "data.val_split=train[49000:49500]", "train.head.epochs=15", "train.finetune.epochs=0.3",
            "telemetry.profile_steps=null", env=REAL, check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    head = [r for r in summary["validation_history"] if r["phase"] == "head"]
    # 330 of the 1,000 images, 2 steps of 128 an epoch; fine-tune 0.3 x 7 steps an epoch.
    assert [r["step"] for r in head] == list(range(2, 31, 2)) and summary["total_steps"] == 32
    head = head[-1]
    assert head["val_accuracy"] > 0.4, head  # ImageNet features transfer (chance 0.1; seen: 0.538)
    import keras
    import tensorflow as tf

    import job.export  # noqa: F401 - registers the serving model's layers

    served = keras.models.load_model(tmp_path / "export" / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    # Flip TTA: an image and its mirror image get the same probabilities.
    np.testing.assert_allclose(served(images), served(mirrored), rtol=1e-4, atol=1e-5)
    assert tf.reduce_all(tf.abs(tf.reduce_sum(served(images), axis=1) - 1) < 1e-4)
