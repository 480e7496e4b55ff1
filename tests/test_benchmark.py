"""The benchmark command, feature caching's equivalence, and that speed settings really take effect."""

import importlib.util
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

from job.benchmark import Budget, _union_length, benchmark, flops_lines, flops_row, format_table, scratch_trainer
from job.config import load_config
from job.flops import forward_flops, model_flops, peak_summary
from job.model import build_model
from job.train import CACHED_STEPS_PER_CALL
from tests.conftest import MOCK, REPO, job_env, tiny

TINY = tiny(MOCK, "data.val_split=null", "train.head.augment=none")
BUDGET = Budget(steps=2, repeats=2, warmup=1, matmul_sizes=(128, 256), matmul_repeats=2)


def test_benchmark_command_prints_the_table_and_writes_every_field(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    args = ["benchmark", str(config), f"workdir={tmp_path}", *TINY, "train.steps_per_call=2",
            "--steps", "2", "--repeats", "2", "--warmup", "1", "--matmul-sizes", "256,512", "--profile"]
    result = subprocess.run([sys.executable, "tests/mock_job.py", "32", *args], cwd=REPO, env=job_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for line in ["phase head: head on cached features", "phase finetune: classifier at 32px", "feature extraction (once)",
                 "(a) input pipeline alone", "(b) train step alone", "(c) end to end", "(d) verdict", "waiting, from timing",
                 "waiting, from profiler",
                 "(e) FLOPs per image", "achieved", "(f) in effect"]:
        assert line in result.stdout, result.stdout
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["model_flops"]["forward_backbone"] > 1e6
    peak = report["matmul_peak"]["float32"]
    # Two sizes, each timed 3 times before and 3 times after the phases: the best of the 12.
    assert peak["runs"] == 12 and set(peak["best_by_size"]) == {"256", "512"}
    assert peak["best"] == max(peak["best_by_size"].values()) >= peak["median"] >= peak["min"] > 0
    head, finetune = report["phases"]
    assert head["settings"]["feature_cache"] and not finetune["settings"]["feature_cache"]
    assert head["feature_extraction"]["images"] == 32
    for phase in (head, finetune):
        for part in ("input", "step", "e2e"):
            assert phase[part]["images_per_sec"] > 0 and len(phase[part]["repeats"]) == 2
        assert phase["verdict"]["bound"] in ("input-bound", "compute-bound")
        assert 0 <= phase["verdict"]["input_wait_share"] < 1 and phase["verdict"]["input_headroom"] > 0
        # Profiled as training profiles: each of the --steps 2 steps its own call and step marker.
        assert 0 <= phase["profile"]["input_wait_share"] <= 1 and phase["profile"]["calls_traced"] == 2
        assert phase["verdict"]["wait_source"] == "profiler"
        assert phase["verdict"]["input_wait_share"] == phase["profile"]["input_wait_share"]
        assert phase["flops"]["train_per_image"] >= phase["flops"]["forward_per_image"] > 0
        assert phase["flops"]["achieved_step"] > 0 and phase["flops"]["utilization_step"] > 0
        assert phase["flops"]["matmul_peak"] == peak["best"]
        settings = phase["settings"]
        assert settings["strategy"] == "_DefaultDistributionStrategy" and settings["replicas"] == 1
        assert settings["precision"] == "float32"
        assert settings["xla_requested"] is False and settings["xla_in_step"] is False
        assert settings["batchnorm_folded"] == 52
    # A head step on cached features is tiny: at least CACHED_STEPS_PER_CALL of them per call.
    assert (head["settings"]["steps_per_call"], finetune["settings"]["steps_per_call"]) == (CACHED_STEPS_PER_CALL, 2)
    assert finetune["settings"]["resize_on"] == "device"
    # The head on cached features: forward and the weight gradient of one Dense layer.
    assert head["flops"]["train_per_image"] == 2 * head["flops"]["forward_per_image"]
    # Everything trained: 3x forward less the first convolution's input gradient (not computed).
    forward = finetune["flops"]["forward_per_image"]
    assert 2.5 * forward < finetune["flops"]["train_per_image"] < 3 * forward


@pytest.fixture
def mock_data():
    with tfds.testing.mock_data(num_examples=32):
        yield


def _head_after_training(tmp_path, cache: bool) -> list:
    config = load_config(None, [*TINY, f"train.cache_features={str(cache).lower()}", "train.head.epochs=2",
                                "train.finetune.epochs=0", "data.shuffle_buffer=16", "checkpoint.every_steps=1000"])
    with scratch_trainer(config) as trainer:
        run = trainer.run
        head = run.phases[0]
        assert run.inputs.use_feature_cache(head) is cache
        trainer.run_phase(head)
        assert run.global_step == 8
        return [w.numpy() for w in run.model.head.weights]


def test_feature_cache_trains_the_same_head_as_running_the_frozen_backbone(tmp_path, mock_data):
    cached, uncached = _head_after_training(tmp_path, True), _head_after_training(tmp_path, False)
    # Same shuffled order, same steps: only float round-off may differ.
    assert not np.allclose(cached[0], 0)
    for a, b in zip(cached, uncached):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_jit_compile_and_steps_per_call_change_what_took_effect(tmp_path, mock_data):
    reports = {}
    for jit, per_call in [(True, 3), (False, 1)]:
        config = load_config(None, [*TINY, "train.cache_features=false", f"train.jit_compile={str(jit).lower()}",
                                    f"train.steps_per_call={per_call}"])
        reports[jit] = benchmark(config, ["head"], BUDGET, workdir=str(tmp_path / str(jit)))
        settings = reports[jit]["phases"][0]["settings"]
        assert (settings["xla_requested"], settings["xla_in_step"], settings["steps_per_call"]) == (jit, jit, per_call)
    assert "XLA on (requested on), steps_per_call 3" in format_table(reports[True])
    assert "XLA off (requested off), steps_per_call 1" in format_table(reports[False])


def test_waiting_time_counts_overlapping_waits_once():
    assert _union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert _union_length([]) == 0


def _script(name):
    """A benchmarks/ script as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_scripts_write_their_ratios(tmp_path, mock_data):
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    tiny = [str(config), f"workdir={tmp_path}", *TINY, "data.val_split=test", "train.head.epochs=1", "train.finetune.epochs=1"]
    assert _script("compare_fit").main([*tiny, "--rounds", "1", "--steps", "2"]) == 0
    fit = json.loads((tmp_path / "compare_fit.json").read_text())
    assert set(fit["ratios"]) == {f"{j}_vs_{r}" for j in ("job_e2e", "job_step") for r in ("fit_same", "fit_tutorial")}
    assert all(v > 0 for v in fit["ratios"].values()) and fit["settings"]["fit_jit_compile"] is False
    assert _script("compare_cache").main(tiny) == 0
    cache = json.loads((tmp_path / "compare_cache.json").read_text())
    assert [r["feature_cache_used"] for r in cache["runs"]] == [False, True] and cache["speedup"] > 0


def test_train_flops_count_what_the_step_computes_not_three_forward_passes():
    """configs/cifar10_quick.yaml's fine-tune (unfreeze=100, 128 px) on cached activations:
    forward of the top alone, backward of the top alone, nothing below the cut."""
    config = load_config(None, ["model.image_size=128", "model.weights=none"])
    flops = model_flops(config, 10, [("head", "features", False), ("frozen", "images", False),
                                     ("finetune", "activations", 100), ("uncached", "images", 100),
                                     ("all", "images", "all")])
    assert flops["outside_layers"] == 0  # every op of the profiled graphs sits in a layer's scope
    whole = flops["forward_backbone"] + flops["forward_head"]
    head, frozen, top, uncached, every = (flops["phases"][k] for k in ("head", "frozen", "finetune", "uncached", "all"))
    # The head on features: forward and its kernel's gradient, no input gradient (old count: 3x).
    assert head["train"] == 2 * head["forward"] == 2 * flops["forward_head"]
    assert frozen["train"] == whole + flops["forward_head"] and frozen["backward_inputs"] == 0

    # The top's forward summed per layer is what the profiler counts for the top as a model of its own.
    model = build_model(config.model, 10, "float32", weights="none")
    split = model.split(100)
    assert (split.first_trainable, top["runs_from"], top["lowest_trained"]) == ("block_6_expand",) * 3
    backbone = model.backbone
    pool = flops["forward_backbone"] - forward_flops(backbone, (128, 128, 3))
    top_alone = forward_flops(keras.Model(backbone.get_layer("block_6_expand").input, backbone.output), split.shape)
    assert top["forward"] == top_alone + pool + flops["forward_head"]
    assert 0.55 * whole < top["forward"] < 0.7 * whole  # the 123 of 200 MFLOP
    # Every layer above block_6_expand takes an input gradient, block_6_expand itself does not.
    expand = forward_flops(keras.Model(backbone.get_layer("block_6_expand").input,
                                       backbone.get_layer("block_6_expand").output), split.shape)
    assert top["backward_inputs"] == top["forward"] - expand
    assert top["backward_weights"] < top["forward"]  # BatchNorm, ReLU, pooling: no trained weights
    assert top["train"] < 0.65 * 3 * whole  # the old count, 3x the whole model, was ~1.6x this
    # Not cached: the bottom runs forward, and still no backward below the cut.
    assert uncached["train"] == top["train"] + (whole - top["forward"])
    assert every["lowest_trained"] == "Conv1" and 2.5 * whole < every["train"] < 3 * whole


def test_a_utilization_over_100_percent_is_flagged_as_a_failed_peak(caplog):
    peak = peak_summary("float32", [(1024, 100e9), (2048, 90e9), (1024, 40e9)])
    assert (peak["best"], peak["median"], peak["min"], peak["best_by_size"]) == (100e9, 90e9, 40e9,
                                                                                  {"1024": 100e9, "2048": 90e9})
    phase = {"name": "finetune", "forward": 100, "backward_weights": 90, "backward_inputs": 80, "train": 270,
             "lowest_trained": "block_6_expand", "runs_from": "block_6_expand"}
    ok = flops_row(phase, 3e8, 2.9e8, peak)
    assert not ok["peak_failed"] and "81.0% of a float32 matmul peak of 100 GFLOP/s" in "\n".join(flops_lines(ok))
    over = flops_row(phase, 4e8, 3.9e8, peak)
    assert over["peak_failed"] and "peak measurement failed" in caplog.text
    table = "\n".join(flops_lines(over))
    assert "108.0% (over 100%: THE PEAK MEASUREMENT FAILED" in table and "median 90 GFLOP/s, slowest 40 GFLOP/s" in table
    assert "machine busy:" not in table
    busy = flops_row(phase, 3e8, 2.9e8, peak_summary("float32", [(1024, 100e9)], (1.0, 7.5)) | {"cores": 2})
    assert "machine busy: load average 1.0/7.5 on 2 cores" in "\n".join(flops_lines(busy))
