"""Bad input, crashes and preemption never lose work or end in a traceback.

Each case of docs/failures.md is run as a user runs the job, `python -m job` in a
subprocess, and the test asserts its exit status, its message and what is left in the
workdir (the last good checkpoint still loads). Waiting on a running job polls for a file
or a log line with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import DATASETS, EXPORTS, KERAS_HOME, REPO, WEIGHTS, job_env, run_job, tiny

CONFIG = "configs/tiny.yaml"
# The cheapest real run: the head phase alone, 8 steps (tests.conftest.TINY).
TINY = tiny("train.finetune.epochs=0")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Environment pointing TFDS and Keras at ../shared (module-wide twin of conftest's real_env)."""
    if not (DATASETS / "cifar10").is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"offline CIFAR-10 and weights not found under {DATASETS.parent}")
    return {"TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME)}


# --- helpers --------------------------------------------------------------------


def start_job(workdir: Path, overrides: list[str], env: dict) -> subprocess.Popen:
    """`python -m job train` in the background; stdout/stderr go to files beside the workdir."""
    out = open(f"{workdir}.stdout", "w")
    err = open(f"{workdir}.stderr", "w")
    return subprocess.Popen([sys.executable, "-m", "job", "train", CONFIG, f"workdir={workdir}", *overrides],
                            cwd=REPO, env=job_env(env), stdout=out, stderr=err, text=True)


def stderr_of(workdir: Path) -> str:
    return Path(f"{workdir}.stderr").read_text()


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 300):
    """Poll `condition` until it is truthy; fail if the deadline passes or `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"job exited {proc.returncode} before {what}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def checkpoint_index(workdir: Path) -> list[str]:
    """Checkpoint names ("ckpt-8") listed in TF's `checkpoint` index, oldest first."""
    index = workdir / "checkpoints" / "checkpoint"
    if not index.is_file():
        return []
    return re.findall(r'all_model_checkpoint_paths: "([^"]+)"', index.read_text())


def assert_loadable(prefix: Path) -> None:
    """Every tensor of the checkpoint reads back (TF checks each one's CRC) and is finite."""
    import numpy as np
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    names = reader.get_variable_to_shape_map()
    assert names, f"{prefix}: empty checkpoint"
    for name in names:
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), f"{prefix}: {name} is not finite"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"exit {result.returncode}, stderr:\n{result.stderr[-4000:]}"
    return lines[0]


def run_concurrently(cases: dict[str, tuple[list[str], dict]]) -> dict[str, subprocess.CompletedProcess]:
    """Many short failing commands at once: they mostly wait on imports and disk."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_job, *args, env=env, timeout=300) for name, (args, env) in cases.items()}
        return {name: future.result() for name, future in futures.items()}


# --- 1 and 2: bad configuration, data or weights: exit 2, one line, nothing written ---------

# case id: (overrides, fragments the one line must contain: setting, bad value, what is allowed)
BAD_CONFIG = {
    "unknown_key": (["train.bogus=1"], ["train.bogus", "unknown setting"]),
    "not_key_value": (["train.batch_size"], ["train.batch_size", "expected key=value"]),
    "wrong_type": (["train.batch_size=abc"], ["train.batch_size='abc'", "valid integer"]),
    "image_size_below_32": (["model.image_size=16"], ["model.image_size=16", "greater than or equal to 32"]),
    "unknown_strategy": (["train.strategy=foo"], ["train.strategy='foo'", "'mirrored'"]),
    "unknown_precision": (["train.precision=fp8"], ["train.precision='fp8'", "'mixed_float16'"]),
    "unknown_weights": (["model.weights=resnet"], ["model.weights='resnet'", "'imagenet', 'none' or a path"]),
    "unknown_dataset": (["data.name=no_such_set"], ["data.name='no_such_set'", "no such TFDS dataset"]),
    "unknown_split": (["data.train_split=validation"], ["split 'validation'", "available: ['train']"]),
    "batch_not_divisible": (["train.strategy=mirrored", "train.cpu_devices=2", "train.batch_size=33"],
                            ["train.batch_size=33", "divisible by the 2 replicas"]),
    "batch_larger_than_split": (["train.batch_size=512"], ["train.batch_size=512", "larger than data.train_split"]),
    "subset_below_a_batch": (["train.head.subset=0.01"], ["train.head.subset=0.01", "fewer than a global batch"]),
    "yaml_syntax_error": (["<bad.yaml>"], ["bad.yaml", "line 2", "invalid YAML"]),
    "missing_config_file": (["<missing.yaml>"], ["missing.yaml", "does not exist"]),
}

BAD_DATA_OR_WEIGHTS = {
    "not_prepared_download_off": (["data.data_dir=<empty>", "data.download=false"],
                                  ["data.name='cifar10' is not prepared in", "data.download=false"]),
    # The request itself must fail: TFDS 4.9.10's download path imported a package it does not require.
    "download_impossible": (["data.data_dir=<empty2>", "data.download=true"],
                            ["data.name='cifar10': download failed (OSError: Could not find a suitable TLS CA"]),
    "data_dir_is_a_dataset_folder": ([f"data.data_dir={DATASETS / 'cifar10'}", "data.download=false"],
                                     ["is not prepared in", "use its parent"]),
    "data_dir_is_a_file": (["data.data_dir=<file>"], ["data.data_dir=", "not a directory"]),
    "weights_missing": (["model.weights=<missing.h5>"], ["model.weights=", "does not exist"]),
    "weights_truncated": (["model.weights=<truncated.h5>"], ["not a readable HDF5", "truncated file"]),
    "weights_other_architecture": (["model.weights=<dense.weights.h5>"], ["cannot load it into MobileNetV2"]),
    "weights_other_alpha": ([f"model.weights={WEIGHTS}", "model.alpha=0.5"],
                            ["cannot load it into MobileNetV2(alpha=0.5)", "Conv1"]),
    "workdir_under_a_file": (["workdir=<file>/run"], ["workdir=", "is not a writable directory"]),
}


@pytest.fixture(scope="module")
def bad_input_results(offline, tmp_path_factory):
    """Runs every bad-input case once (concurrently); each test below checks its own."""
    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "bad.yaml").write_text("train:\n\tbatch_size: 32\n")  # YAML forbids tabs for indentation
    (tmp / "file").write_text("not a directory\n")
    (tmp / "empty").mkdir()
    (tmp / "empty2").mkdir()
    (tmp / "truncated.h5").write_bytes(WEIGHTS.read_bytes()[: 1 << 20])
    import keras

    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    dense.save_weights(tmp / "dense.weights.h5")

    def expand(arg: str) -> str:
        return re.sub(r"<([^>]+)>", lambda m: str(tmp / m.group(1)), arg)

    # No network: a download must fail however TFDS tries (HTTP(S) through a closed port). An
    # unreadable CA bundle makes `requests` fail before it connects, so TFDS's 10 retries with
    # backoff (3.5 min against a closed port) do not slow the suite; the failure still comes
    # from the HTTPS request, after every import and step of TFDS's download path.
    no_network = {**offline, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
                  "REQUESTS_CA_BUNDLE": str(tmp / "no-ca-bundle.pem")}
    cases = {}
    for name, (overrides, _) in {**BAD_CONFIG, **BAD_DATA_OR_WEIGHTS}.items():
        overrides = [expand(o) for o in overrides]
        config = overrides.pop(0) if overrides[0].endswith(".yaml") else CONFIG
        workdir = [] if any(o.startswith("workdir=") for o in overrides) else [f"workdir={tmp / name / 'run'}"]
        cases[name] = (["train", config, *TINY, *workdir, *overrides], no_network)
    return tmp, run_concurrently(cases)


def _assert_bad_input(case: str, fragments: list[str], bad_input_results) -> None:
    tmp, results = bad_input_results
    result = results[case]
    if case == "download_impossible":  # TFDS's download progress bars come first, on stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-4000:]
    else:  # TFDS prints "Downloading and preparing..." to stdout
        line = one_error_line(result)
        assert result.stdout == ""
    assert result.returncode == 2, line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not (tmp / case).exists(), "bad input must not create the workdir"


@pytest.mark.real_data
@pytest.mark.parametrize("case", BAD_CONFIG)
def test_bad_configuration_exits_2_with_one_line(case, bad_input_results):
    _assert_bad_input(case, BAD_CONFIG[case][1], bad_input_results)


@pytest.mark.real_data
@pytest.mark.parametrize("case", BAD_DATA_OR_WEIGHTS)
def test_bad_data_weights_or_workdir_exits_2_with_one_line(case, bad_input_results):
    _assert_bad_input(case, BAD_DATA_OR_WEIGHTS[case][1], bad_input_results)


def mount_tmpfs(target: Path, options: str):
    """A real tmpfs at `target` (yielded, unmounted after); skips where mounting is not allowed."""
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.decode().strip()}")
    yield target
    subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only mount: unwritable even for root."""
    yield from mount_tmpfs(tmp_path / "ro", "size=1m,ro")


@pytest.mark.real_data
def test_read_only_workdir_exits_2_with_one_line(offline, read_only_dir):
    result = run_job("train", CONFIG, *TINY, f"workdir={read_only_dir / 'run'}", env=offline)
    line = one_error_line(result)
    assert result.returncode == 2
    assert f"workdir='{read_only_dir / 'run'}'" in line and "not a writable directory" in line


# --- 3: a busy workdir, a full disk --------------------------------------------------------


@pytest.fixture(scope="module")
def live_run(offline, tmp_path_factory):
    """A run far too long (100 epochs) to end on its own; killed at teardown if still alive."""
    workdir = tmp_path_factory.mktemp("live") / "run"
    overrides = [*TINY, "data.train_split=train[:8192]", "data.val_split=null", "train.head.epochs=100",
                 "checkpoint.every_steps=100000"]
    proc = start_job(workdir, overrides, offline)
    # The lock is taken once settings, data and weights are checked; it holds the owner's pid.
    wait_for(lambda: (workdir / ".lock").is_file() and (workdir / ".lock").read_text() == str(proc.pid),
             "the run to lock its workdir", proc)
    yield workdir, overrides, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.real_data
def test_second_run_on_a_live_workdir_is_refused_with_its_pid(live_run, offline):
    workdir, overrides, proc = live_run
    result = run_job("train", CONFIG, *overrides, f"workdir={workdir}", env=offline)
    line = one_error_line(result)
    assert result.returncode == 2
    assert f"in use by a live run (pid {proc.pid})" in line
    assert proc.poll() is None, "the first run must carry on"
    assert (workdir / ".lock").read_text() == str(proc.pid)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB disk: room for one 5 MB checkpoint, not two."""
    yield from mount_tmpfs(tmp_path / "disk", "size=8m")


@pytest.mark.real_data
def test_disk_full_while_saving_keeps_the_previous_checkpoint(offline, small_disk):
    workdir = small_disk / "run"
    result = run_job("train", CONFIG, *TINY, f"workdir={workdir}", env=offline)
    line = result.stderr.splitlines()[-1]
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert line.startswith("error: checkpoint of step 8 could not be written") and "No space left on device" in line, line
    assert f"the previous checkpoint {workdir / 'checkpoints' / 'ckpt-4'} is intact" in line
    assert checkpoint_index(workdir) == ["ckpt-4"]
    assert_loadable(workdir / "checkpoints" / "ckpt-4")
    assert not list((workdir / "checkpoints").glob("*_temp")), "the failed save's partial files are removed"


# --- 4: numerical faults -------------------------------------------------------------------


@pytest.mark.real_data
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(offline, tmp_path):
    # A learning rate no one should use but anyone can type: one update makes the logits
    # overflow float32, and the fine-tune's loss goes non-finite.
    workdir = tmp_path / "run"
    result = run_job("train", CONFIG, *TINY, "train.finetune.epochs=1", "train.finetune.learning_rate=1e38",
                     f"workdir={workdir}", env=offline)
    line = result.stderr.splitlines()[-1]
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    match = re.fullmatch(r"error: non-finite (?:loss|weights) in phase finetune (?:at|after) step (\d+); "
                         r"stopped without saving, last good checkpoint: (\S+)", line)
    assert match, line
    step, last_good = int(match[1]), Path(match[2])
    assert step > 8, "the head phase (steps 1..8) trains normally"
    assert checkpoint_index(workdir)[-1] == last_good.name
    assert int(last_good.name.split("-")[1]) < step
    assert_loadable(last_good)


@pytest.mark.slow
@pytest.mark.real_data
def test_mixed_float16_counts_skipped_steps_instead_of_stopping(offline, tmp_path):
    workdir = tmp_path / "run"
    # A head learning rate of 1e6 leaves head weights in the millions: back-propagated into
    # the float16 backbone, the fine-tune's gradients overflow, and the loss scaler skips
    # those steps (the loss itself stays finite: logits are float32). Real ImageNet weights,
    # since randomly initialised features are all zero at 32 px and pass no gradient.
    result = run_job("train", CONFIG, *TINY, "model.weights=imagenet", "model.alpha=1.0",
                     "train.precision=mixed_float16", "train.head.learning_rate=1e6",
                     "data.train_split=train[:64]", "train.batch_size=16",
                     "data.val_split=null", "train.finetune.epochs=1", "telemetry.log_every_steps=1",
                     f"workdir={workdir}", env=offline)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "skipped by the loss scaler (non-finite gradients)" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["step"] == 8
    import tensorflow as tf

    skipped = 0.0
    for events in (workdir / "tensorboard" / "train").glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag == "finetune/skipped_steps":
                    skipped += float(tf.make_ndarray(value.tensor))
    assert 1 <= skipped <= 4, skipped


# --- 5: preemption ---------------------------------------------------------------------------


@pytest.mark.real_data
def test_sigterm_saves_at_the_next_step_and_exits_0(live_run):
    workdir, _, proc = live_run
    wait_for(lambda: "phase head: steps 0..25600" in stderr_of(workdir), "training to start", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, stderr_of(workdir)[-4000:]
    last = stderr_of(workdir).splitlines()[-1]
    match = re.fullmatch(r"stopped by signal 15 at step (\d+); checkpoint (\S+); rerun the same command to resume", last)
    assert match, last
    step, checkpoint = int(match[1]), Path(match[2])
    assert 0 < step < 25600
    assert checkpoint == workdir / "checkpoints" / f"ckpt-{step}"
    assert checkpoint_index(workdir)[-1] == checkpoint.name
    assert_loadable(checkpoint)
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("preempted", step)


@pytest.fixture(scope="module")
def killed_run(offline, tmp_path_factory):
    """A 32-step run SIGKILLed once it has two checkpoints; each test resumes a copy of it."""
    workdir = tmp_path_factory.mktemp("killed") / "run"
    overrides = [*TINY, "data.train_split=train[:1024]"]
    proc = start_job(workdir, overrides, offline)
    wait_for(lambda: len(checkpoint_index(workdir)) >= 2, "two checkpoints", proc)
    proc.kill()
    proc.wait()
    return workdir, overrides


def _resume_copy(killed_run, tmp_path: Path, offline: dict):
    source, overrides = killed_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    return workdir, run_job("train", CONFIG, *overrides, f"workdir={workdir}", env=offline)


@pytest.mark.real_data
def test_after_sigkill_a_rerun_resumes_and_ends_at_the_planned_step(killed_run, offline, tmp_path):
    latest = checkpoint_index(killed_run[0])[-1]
    workdir, result = _resume_copy(killed_run, tmp_path, offline)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {workdir / 'checkpoints' / latest} at step {latest.split('-')[1]}" in result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    # The same count as a run never interrupted: 1024 images / 32 per batch, one epoch.
    assert (summary["status"], summary["step"], summary["total_steps"]) == ("finished", 32, 32)
    assert [row["step"] for row in summary["validation_history"]] == [32]


# --- 6: checkpoint integrity -------------------------------------------------------------------


@pytest.mark.real_data
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(killed_run, offline, tmp_path):
    source, overrides = killed_run
    *_, previous, latest = checkpoint_index(source)
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    data = next((workdir / "checkpoints").glob(f"{latest}.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a half-written file, as a crashed disk leaves
    proc = start_job(workdir, overrides, offline)
    # Once it has resumed, stop it (SIGTERM): that it trains on and saves is all that is left to see.
    wait_for(lambda: "resumed from" in stderr_of(workdir), "the rerun to restore a checkpoint", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, stderr_of(workdir)[-4000:]
    stderr = stderr_of(workdir)
    assert re.search(rf"WARNING .*checkpoint {re.escape(str(workdir / 'checkpoints' / latest))} is unreadable .*"
                     r"falling back to the previous one", stderr), stderr[-4000:]
    restored_step = int(previous.split("-")[1])
    assert f"resumed from {workdir / 'checkpoints' / previous} at step {restored_step}" in stderr
    match = re.fullmatch(r"stopped by signal 15 at step (\d+); checkpoint (\S+); rerun the same command to resume",
                         stderr.splitlines()[-1])
    assert match and int(match[1]) > restored_step, stderr[-2000:]
    assert_loadable(Path(match[2]))


@pytest.mark.real_data
def test_no_readable_checkpoint_refuses_to_start_over(killed_run, offline, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(killed_run[0], workdir)
    for data in (workdir / "checkpoints").glob("*.data-*"):
        data.write_bytes(data.read_bytes()[:1000])
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    result = run_job("train", CONFIG, *killed_run[1], f"workdir={workdir}", env=offline)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert re.fullmatch(r"error: none of the \d checkpoints in \S+ reads back \(see the warnings above\); "
                        r"move them away to start over", result.stderr.splitlines()[-1]), result.stderr[-2000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before, "nothing rotated away"


# --- 5 (data): a resumed pipeline yields exactly the batches an uninterrupted one would ----------


@pytest.mark.real_data
def test_resumed_pipeline_sees_the_same_batches(real_env):
    import numpy as np

    from job import data as data_lib
    from job.config import DataConfig

    # data_dir explicitly: TFDS reads TFDS_DATA_DIR once, when first imported in this process.
    config = DataConfig(data_dir=real_env["TFDS_DATA_DIR"], augment="flip_crop", shuffle_buffer=256)
    # 8 batches per epoch: skipping 10 lands mid-way through the second, reshuffled epoch.
    uninterrupted = list(data_lib.train_dataset(config, "train[:256]", 32, 32, seed=3).take(14))[10:]
    resumed = list(data_lib.train_dataset(config, "train[:256]", 32, 32, seed=3, skip_batches=10).take(4))
    for (images, labels), (images_r, labels_r) in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(labels.numpy(), labels_r.numpy())
        np.testing.assert_array_equal(images.numpy(), images_r.numpy())


# --- 7: changed settings on resume ---------------------------------------------------------------


def _copy_of_killed_run(killed_run, tmp_path):
    """(workdir holding a copy of the killed run, its overrides, its config.yaml text)."""
    source, overrides = killed_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    return workdir, overrides, (workdir / "config.yaml").read_text()


@pytest.mark.real_data
def test_a_rerun_that_changes_what_a_step_means_is_refused(killed_run, offline, tmp_path):
    workdir, overrides, before = _copy_of_killed_run(killed_run, tmp_path)
    result = run_job("train", CONFIG, *overrides, "train.batch_size=16", "data.train_split=train[:512]",
                     f"workdir={workdir}", env=offline)
    line = one_error_line(result)
    assert result.returncode == 2
    assert line == (f"error: workdir {str(workdir)!r} holds a run whose saved steps mean something else with these "
                    "settings: global batch 32 before, 16 now; data.train_split 'train[:1024]' before, 'train[:512]' "
                    "now; use another workdir, or set them back"), line
    assert (workdir / "config.yaml").read_text() == before


@pytest.mark.real_data
def test_a_rerun_with_safe_changes_resumes_and_keeps_the_old_config(killed_run, offline, tmp_path):
    workdir, overrides, before = _copy_of_killed_run(killed_run, tmp_path)
    result = run_job("train", CONFIG, *overrides, "train.head.learning_rate=0.002", "telemetry.log_every_steps=4",
                     f"workdir={workdir}", env=offline)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming with a changed setting: train.head.learning_rate 0.001 -> 0.002" in result.stderr
    assert "resuming with a changed setting: telemetry.log_every_steps 2 -> 4" in result.stderr
    kept = list(workdir.glob("config.*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == before
    assert "learning_rate: 0.002" in (workdir / "config.yaml").read_text()
    assert json.loads((workdir / "summary.json").read_text())["step"] == 32


# --- 7: settings that change what a checkpoint holds (optimizer slots, trained variables) --------

# What TensorFlow prints when a restore does not match: never on the console.
TF_RESTORE_NOISE = re.compile(r"Value in checkpoint could not be found|unrestored values|tensorflow:|incompatible tensor")


@pytest.fixture(scope="module")
def finished_run(offline, tmp_path_factory):
    """Both phases to the end (8 head steps, then 8 fine-tune steps, a checkpoint every 4): the
    workdir each test reruns a copy of with one setting changed."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    overrides = tiny()
    run_job("train", CONFIG, *overrides, f"workdir={workdir}", env=offline, check=True)
    return workdir, overrides


def _checkpoint_bytes(workdir: Path) -> dict:
    """Every checkpoint file, and the run's config.yaml, as bytes."""
    return {**{p.name: p.read_bytes() for p in sorted((workdir / "checkpoints").iterdir())},
            "config.yaml": (workdir / "config.yaml").read_bytes()}


def _rerun_copy(finished_run, tmp_path: Path, offline: dict, *changes: str):
    source, overrides = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    before = _checkpoint_bytes(workdir)
    result = run_job("train", CONFIG, *overrides, *changes, f"workdir={workdir}", env=offline)
    assert not TF_RESTORE_NOISE.search(result.stderr), result.stderr[-4000:]
    assert " is unreadable" not in result.stderr, result.stderr[-4000:]
    return workdir, before, result


# Each setting that changes what the fine-tune optimizer holds, with one more fine-tune epoch
# (the phase is then under way at the restored step 16): refused, one line with both values.
STATE_CHANGES = {
    "optimizer": (["train.finetune.optimizer=sgd"], "train.finetune.optimizer 'adam' before, 'sgd' now"),
    "unfreeze": (["train.finetune.unfreeze=50"], "train.finetune.unfreeze 'all' before, 50 now"),
    "loss_scaling": (["train.precision=mixed_float16"], "train.precision 'float32' before, 'mixed_float16' now"),
    "cache_frozen": (["train.finetune.unfreeze=56", "train.finetune.cache_frozen=true"],
                     "train.finetune.unfreeze 'all' before, 56 now"),
}


@pytest.mark.real_data
@pytest.mark.parametrize("case", list(STATE_CHANGES))
def test_a_setting_that_changes_the_saved_state_of_a_phase_under_way_is_refused(case, finished_run, offline, tmp_path):
    changes, named = STATE_CHANGES[case]
    workdir, before, result = _rerun_copy(finished_run, tmp_path, offline, *changes, "train.finetune.epochs=2")
    line = one_error_line(result)
    assert result.returncode == 2
    assert line.startswith(f"error: workdir {str(workdir)!r}: checkpoint ckpt-16 holds the finetune optimizer state "
                           f"of other settings ({named}; "), line
    assert re.search(r"finetune: \d+ variables saved, \d+ needed", line), line
    assert line.endswith("that phase is under way at step 16: set them back, use another workdir, or set "
                         "train.reset_optimizer=true to keep the weights and start the optimizer fresh"), line
    assert _checkpoint_bytes(workdir) == before


@pytest.mark.real_data
def test_a_changed_setting_of_a_finished_phase_restores_the_weights_and_says_so(finished_run, offline, tmp_path):
    workdir, before, result = _rerun_copy(finished_run, tmp_path, offline, "train.finetune.unfreeze=50", EXPORTS)
    assert result.returncode == 0, result.stderr[-4000:]
    notes = [line for line in result.stderr.splitlines() if "optimizer starts fresh" in line]
    assert len(notes) == 1 and re.search(
        r"INFO job.resume: checkpoint ckpt-16 holds the finetune optimizer state of other settings "
        r"\(train.finetune.unfreeze 'all' before, 50 now; finetune: \d+ variables saved, \d+ needed.*\): restoring the "
        r"weights, the optimizer starts fresh \(its phase is not under way at step 16\)$", notes[0]), notes
    assert f"resumed from {workdir / 'checkpoints' / 'ckpt-16'} at step 16" in result.stderr
    assert "WARNING" not in result.stderr, result.stderr[-4000:]  # the export's partial restore says nothing
    after = _checkpoint_bytes(workdir)
    assert after.pop("config.yaml") != before.pop("config.yaml") and after == before  # a resume: the new config


@pytest.mark.slow
@pytest.mark.real_data
def test_reset_optimizer_trains_on_with_a_fresh_optimizer_and_a_truncated_newest_still_falls_back(
        finished_run, offline, tmp_path):
    source, overrides = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    data = next((workdir / "checkpoints").glob("ckpt-16.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    result = run_job("train", CONFIG, *overrides, "train.finetune.optimizer=sgd", "train.finetune.epochs=2",
                     "train.reset_optimizer=true", f"workdir={workdir}", env=offline)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not TF_RESTORE_NOISE.search(result.stderr), result.stderr[-4000:]
    assert re.search(r"holds the finetune optimizer state of other settings \(train.finetune.optimizer 'adam' before, "
                     r"'sgd' now; .*\): restoring the weights, the optimizer starts fresh \(train.reset_optimizer=true\)",
                     result.stderr), result.stderr[-4000:]
    # The damaged newest is called unreadable (damage, not settings) and the previous one restored.
    assert re.search(rf"checkpoint {re.escape(str(workdir / 'checkpoints' / 'ckpt-16'))} is unreadable .*falling back",
                     result.stderr), result.stderr[-4000:]
    assert f"resumed from {workdir / 'checkpoints' / 'ckpt-12'} at step 12" in result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("finished", 24)
    # The next rerun finds checkpoints of its own settings: an ordinary resume, no note.
    again = run_job("train", CONFIG, *overrides, "train.finetune.optimizer=sgd", "train.finetune.epochs=2",
                    f"workdir={workdir}", env=offline)
    assert again.returncode == 0 and "optimizer starts fresh" not in again.stderr, again.stderr[-4000:]


def test_a_new_worker_count_with_per_replica_batch_names_train_batch_size(tmp_path):
    from job.config import load_config
    from job.errors import ConfigError
    from job.resume import check_resume, write_run_files
    from job.storage import Workdir

    workdir = Workdir.open(str(tmp_path / "run"))
    os.makedirs(workdir.local)
    config = load_config(str(REPO / CONFIG), ["train.per_replica_batch_size=16", f"workdir={workdir.local}"])
    write_run_files(workdir, config, {"global_batch": 32})
    with pytest.raises(ConfigError) as refused:
        check_resume(workdir, config, 64)
    assert str(refused.value) == (
        f"workdir {workdir.local!r} holds a run whose saved steps mean something else with these settings: global "
        "batch 32 before, 64 now (train.per_replica_batch_size=16 x 4 replicas; train.batch_size=32 "
        "train.per_replica_batch_size=null keeps the global batch fixed on any worker count); use another workdir, "
        "or set them back")
