"""The benchmark command, feature caching's equivalence, and that speed settings really take effect."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from job.benchmark import Budget, _union_length, benchmark, format_table, scratch_trainer
from job.config import load_config
from job.train import CACHED_STEPS_PER_CALL
from tests.conftest import MOCK, REPO, job_env, tiny

TINY = tiny(MOCK, "data.val_split=null", "train.head.augment=none")
BUDGET = Budget(steps=2, repeats=2, warmup=1)


def test_benchmark_command_prints_the_table_and_writes_every_field(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    args = ["benchmark", str(config), f"workdir={tmp_path}", *TINY, "train.steps_per_call=2",
            "--steps", "2", "--repeats", "2", "--warmup", "1", "--profile"]
    result = subprocess.run([sys.executable, "tests/mock_job.py", "32", *args], cwd=REPO, env=job_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for line in ["phase head: head on cached features", "phase finetune: classifier at 32px", "feature extraction (once)",
                 "(a) input pipeline alone", "(b) train step alone", "(c) end to end", "(d) verdict", "waiting, from timing",
                 "waiting, from profiler",
                 "(e) FLOPs per image", "(f) in effect"]:
        assert line in result.stdout, result.stdout
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["model_flops"]["forward_backbone"] > 1e6 and report["matmul_peak_flops"]["float32"] > 1e8
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
        settings = phase["settings"]
        assert settings["strategy"] == "_DefaultDistributionStrategy" and settings["replicas"] == 1
        assert settings["precision"] == "float32"
        assert settings["xla_requested"] is False and settings["xla_in_step"] is False
        assert settings["batchnorm_folded"] == 52
    # A head step on cached features is tiny: at least CACHED_STEPS_PER_CALL of them per call.
    assert (head["settings"]["steps_per_call"], finetune["settings"]["steps_per_call"]) == (CACHED_STEPS_PER_CALL, 2)
    assert finetune["settings"]["resize_on"] == "device"
    assert finetune["flops"]["train_per_image"] == 3 * finetune["flops"]["forward_per_image"]


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
        assert run.use_feature_cache(head) is cache
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
