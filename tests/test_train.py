"""The distributed train loop on mock data: phases, step counts, strategies, precisions."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from job.config import load_config
from job.export import restore_classifier
from job.train import plan_phases, train_and_evaluate
from job.model import build_model
from tests.conftest import MOCK, REPO, WEIGHTS, job_env, tiny

FAST = tiny(MOCK, "train.finetune.unfreeze=20")


def _mock_cli(workdir, *overrides, examples=32):
    """Train through the CLI in a fresh process (logical CPU devices need one) on mock data."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.in.yaml"
    config.write_text("{}\n")
    args = ["train", str(config), f"workdir={workdir}", *FAST, *overrides]
    result = subprocess.run([sys.executable, "tests/mock_job.py", str(examples), *args], cwd=REPO, env=job_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((workdir / "summary.json").read_text())


def _weights(workdir, checkpoint=None, alpha=0.35):
    """Classifier weights restored from a workdir's latest (or a named) checkpoint, by name."""
    config = load_config(None, [f"workdir={workdir}", *FAST, f"model.alpha={alpha}"])
    with tfds.testing.mock_data(num_examples=8):
        model, _, _ = restore_classifier(config, str(workdir), checkpoint)
    return {v.path: v.numpy() for v in model.classifier.weights}


def test_phases_split_steps_by_epochs_of_their_share_of_the_split():
    config = load_config(None, ["train.head.epochs=1.5", "train.finetune.epochs=0"])
    head, finetune = plan_phases(config, train_size=640, global_batch=64)
    assert (head.first_step, head.steps, finetune.first_step, finetune.steps) == (0, 15, 15, 0)
    config = load_config(None, ["train.head.epochs=2", "train.head.subset=0.25", "train.finetune.epochs=1"])
    head, finetune = plan_phases(config, train_size=640, global_batch=64)
    assert (head.steps_per_epoch, head.steps, finetune.first_step, finetune.steps) == (2, 4, 4, 10)


def test_two_phases_run_to_the_planned_step(tmp_path):
    config = load_config(None, [f"workdir={tmp_path}", *FAST])
    with tfds.testing.mock_data(num_examples=32):
        summary = train_and_evaluate(config)
    assert summary["status"] == "finished" and summary["step"] == summary["total_steps"] == 8
    assert [row["phase"] for row in summary["validation_history"]] == ["head", "finetune"]
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-8")


def test_head_phase_leaves_the_backbone_untouched(tmp_path):
    config = load_config(None, [f"workdir={tmp_path}", *FAST, "train.finetune.epochs=0", "checkpoint.every_steps=1", "checkpoint.keep=10"])
    with tfds.testing.mock_data(num_examples=32):
        train_and_evaluate(config)
    last, first = _weights(tmp_path), _weights(tmp_path, str(tmp_path / "checkpoints" / "ckpt-1"))
    # ckpt-1 is after one head step; from then on only the head's kernel and bias move.
    changed = [k for k, v in last.items() if not np.array_equal(v, first[k])]
    assert len(last) > 100
    assert sorted(last[k].shape for k in changed) == [(10,), (1280, 10)]


@pytest.mark.slow
def test_finetune_on_cached_frozen_activations_matches_training_on_images(tmp_path):
    """cache_frozen changes where the frozen bottom runs, not the numbers: same flips (from the
    mirrored images' activations), same flip test-time augmentation, same sharpened upscaling,
    the same first half of the images for the head (train.head.subset), same weights."""
    common = [*FAST, "train.finetune.unfreeze=100", "data.augment=flip", "train.head.augment=none", "train.head.subset=0.5",
              "model.flip_tta=true", "data.resize_method=bicubic", "data.sharpen=2.0", "model.image_size=48"]
    summaries = {}
    for cache in (True, False):
        config = load_config(None, [f"workdir={tmp_path / str(cache)}", *common, f"train.finetune.cache_frozen={cache}"])
        with tfds.testing.mock_data(num_examples=32):
            summaries[cache] = train_and_evaluate(config)
    # 16 of the 32 images, 8 a batch: 2 head steps, then 4 fine-tune steps over all of them.
    assert summaries[True]["total_steps"] == summaries[False]["total_steps"] == 6
    cached, plain = ([(r["val_accuracy"], r["val_loss"]) for r in summaries[c]["validation_history"]] for c in (True, False))
    np.testing.assert_allclose(cached, plain, rtol=1e-4)
    cached, plain = _weights(tmp_path / "True"), _weights(tmp_path / "False")
    for name, value in plain.items():
        np.testing.assert_allclose(cached[name], value, rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.real_data
def test_mirrored_on_two_cpu_devices_matches_one_device(tmp_path):
    """Same global batch over 2 replicas or 1: the loss is averaged over the global batch,
    so the trained weights agree (BatchNorm is in inference mode, dropout is off). SGD, because
    Adam's normalisation turns float-rounding differences in near-zero gradients into full steps.
    Real ImageNet weights: with random ones the features are ~0 and the comparison is vacuous."""
    if not WEIGHTS.is_file():
        pytest.skip("offline ImageNet weights not found")
    common = ["data.augment=none", "train.cache_features=false", "train.finetune.epochs=0.5",
              "train.head.optimizer=sgd", "train.finetune.optimizer=sgd", "train.finetune.learning_rate=0.001",
              "model.alpha=1.0", f"model.weights={WEIGHTS}"]
    one = _mock_cli(tmp_path / "one", *common, "train.strategy=default")
    two = _mock_cli(tmp_path / "two", *common, "train.strategy=mirrored", "train.cpu_devices=2")
    assert one["replicas"] == 1 and two["replicas"] == 2 and two["strategy"] == "MirroredStrategy"
    assert one["step"] == two["step"] == 6
    a, b = _weights(tmp_path / "one", alpha=1.0), _weights(tmp_path / "two", alpha=1.0)
    config = load_config(None, [*FAST, *common])
    start = {v.path: v.numpy() for v in build_model(config.model, 10).backbone.weights}
    moved = max(np.abs(a[k] - start[k]).max() for k in start)
    assert moved > 1e-4  # fine-tuning really changed the backbone...
    for key in a:  # ...and both strategies changed it the same way
        np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=moved * 1e-2, err_msg=key)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains(tmp_path, precision):
    summary = _mock_cli(tmp_path, f"train.precision={precision}", "train.steps_per_call=2")
    assert summary["step"] == 8
    events = "".join(str(p) for p in (tmp_path / "tensorboard" / "train").iterdir())
    assert events
    tags = set()
    for path in (tmp_path / "tensorboard" / "train").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    assert "finetune/images_per_sec" in tags and "finetune/learning_rate" in tags
    assert ("finetune/loss_scale" in tags) == (precision == "mixed_float16")


def _traced_steps(profile_dir) -> list[str]:
    """The step markers in a profiler trace, as the profiler grouped them ("train <step>")."""
    from xprof.convert import raw_to_tool_data

    paths = sorted(str(p) for p in profile_dir.glob("plugins/profile/*/*.xplane.pb"))
    if not paths:
        return []
    trace, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    events = json.loads(trace if isinstance(trace, str) else trace.decode())["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("train ")})


def test_profile_window_is_traced_whatever_steps_per_call(tmp_path, caplog):
    """8 steps per call and validation every 4 steps: no chunk starts inside [5, 7) of the
    fine-tune phase, yet exactly its two steps are traced, each under its own marker."""
    config = load_config(None, [f"workdir={tmp_path}", *FAST, "train.steps_per_call=8", "train.finetune.epochs=2",
                                "telemetry.profile_phase=finetune", "telemetry.profile_steps=[5,7]"])
    with tfds.testing.mock_data(num_examples=32):
        summary = train_and_evaluate(config)
    assert summary["step"] == 12  # 4 head steps, then 8 fine-tune steps
    assert _traced_steps(tmp_path / "tensorboard" / "train") == ["train 10", "train 9"]  # global steps 4+5, 4+6


def test_a_profile_window_that_cannot_be_reached_is_a_warning(tmp_path, caplog):
    config = load_config(None, [f"workdir={tmp_path}", *FAST, "telemetry.profile_steps=[20,25]"])
    with tfds.testing.mock_data(num_examples=32), caplog.at_level("WARNING"):
        train_and_evaluate(config)
    assert "telemetry.profile_steps=[20, 25] starts after the last step of phase finetune (4 steps)" in caplog.text
    assert not (tmp_path / "tensorboard" / "train" / "plugins").exists()


def test_every_worker_runs_the_profile_window_alone_even_without_tracing():
    """Multi-worker runs trace on the chief only: the others must still run the window's steps
    one call each, or their collectives would not match the chief's (a hang)."""
    from job.periodic import chunk_length
    from job.telemetry import ProfilerWindow

    def calls(window):
        position, sizes = 0, []
        while position < 12:
            if window.covers(position):
                n = 1
                window.run_step(position, position, lambda: None)
            else:
                n = chunk_length(position, 12, 8, [window.next_start(position)])
            position += n
            window.after(position)
            sizes.append(n)
        return sizes

    assert calls(ProfilerWindow(None, (5, 7))) == [4, 1, 1, 1, 5]  # 4 steps, warm-up step 4, steps 5 and 6 alone


def test_a_mirrored_profile_shows_step_times(tmp_path):
    """MirroredStrategy over 2 logical CPU devices: the Profile tab's overview page finds each
    traced step, as for one device."""
    from job.profile import step_summary, traces

    summary = _mock_cli(tmp_path, "train.strategy=mirrored", "train.cpu_devices=2", "train.steps_per_call=4",
                        "telemetry.profile_phase=finetune", "telemetry.profile_steps=[1,3]")
    assert summary["replicas"] == 2
    (trace,) = traces(str(tmp_path / "tensorboard" / "train"))
    page = step_summary(trace, "input_pipeline_analyzer")
    assert page["step_names"] == ["train 5", "train 6"] and page["average_step_ms"] > 0 and not page["no_step_marker"]
