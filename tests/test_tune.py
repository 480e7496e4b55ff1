"""`python -m job tune`: bad search files fail in one line before Ray starts; a tiny search on
the embedded Ray (one search shared by the assertions) writes results.csv and a best.yaml that
`train` runs, and ASHA stops the trials whose learning rate cannot learn.

The data is a folder of fake images (data.image_dir): dark images are one class, bright ones
the other, so a trial that trains learns them in a few steps and one whose learning rate is
1e-9 stays where it started. A folder, not tfds.testing.mock_data: each trial runs in its own
Ray process, where the mock would not be in effect.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml
from PIL import Image

from job.__main__ import main
from job.config import load_config
from job.tune import load_search
from tests.conftest import REPO, run_job, tiny

GOOD, BAD = 0.05, 1e-9


def _images(root, split: str, count: int) -> None:
    rng = np.random.default_rng(len(split))
    for label, (low, high) in enumerate([(0, 60), (195, 255)]):
        folder = root / split / ("dark", "bright")[label]
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(low, high, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _args(root, workdir, *more: str) -> list[str]:
    """The tiny run (conftest.TINY) on the image folder, cheaper still: the head alone, 2 epochs
    of 4 steps on cached features (no augmentation), a validation after each. ImageNet weights:
    a random MobileNetV2's features vanish (about 1e-12 here), so without them no learning rate
    would learn even dark from bright."""
    return tiny(f"data.image_dir={root}", "data.train_split=train", "data.val_split=validation",
                "data.augment=none", "train.batch_size=8", "train.head.epochs=2", "train.finetune.epochs=0",
                "model.alpha=1.0", "model.weights=imagenet", f"workdir={workdir}", *more)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def real_weights():
    """The offline ImageNet weights (KERAS_HOME), as conftest.real_env finds them, for a module fixture."""
    from tests.conftest import DATASETS, KERAS_HOME, SHARED, WEIGHTS

    if not WEIGHTS.is_file():
        pytest.skip(f"offline ImageNet weights not found under {SHARED}")
    return {"TFDS_DATA_DIR": str(DATASETS), "KERAS_HOME": str(KERAS_HOME)}


@pytest.fixture(scope="module")
def search(tmp_path_factory, real_weights):
    """One search of 4 trials on the embedded Ray, one at a time: a grid of (good, bad) head
    learning rates, twice, each with a sampled dropout. Trials run in order, good first, so ASHA
    (grace period 1 validation) has a good trial's first validation on record when each bad
    trial reaches its own, and stops it there."""
    tmp = tmp_path_factory.mktemp("tune")
    _images(tmp / "images", "train", 16)
    _images(tmp / "images", "validation", 8)
    spec = _write(tmp / "search.yaml", f"""
trials: 2
metric: val_accuracy
scheduler: asha
grace_period: 1
max_concurrent: 1
seed: 0
space:
  train.head.learning_rate: {{grid: [{GOOD}, {BAD}]}}
  model.dropout: {{uniform: [0.0, 0.1]}}
""")
    args = _args(tmp / "images", tmp / "run")
    result = run_job("tune", "configs/tiny.yaml", spec, *args, env=real_weights, timeout=900)
    return tmp, result, args


def test_the_shipped_search_files_validate():
    for path in sorted((REPO / "configs").glob("tune_*.yaml")):
        base = load_config(str(REPO / "configs" / "cifar10_quick.yaml"))
        assert load_search(str(path), base).space, path


def test_bad_search_files_fail_in_one_line_before_ray_starts(tmp_path, monkeypatch, capsys):
    cases = {
        "unknown key": ("trials: 2\nsheduler: asha\nspace: {train.head.epochs: {choice: [1]}}\n",
                        "sheduler: unknown setting"),
        "unknown setting": ("space: {train.bogus: {choice: [1, 2]}}\n", "space.train.bogus {choice: [1, 2]}: "
                                                                        "train.bogus: unknown setting"),
        "refused choice": ("space: {model.image_size: {choice: [16, 96]}}\n",
                           "model.image_size=16: Input should be greater than or equal to 32"),
        "fractional sample of an int": ("space: {train.batch_size: {uniform: [16, 64]}}\n",
                                        "train.batch_size=34.33"),
        "bad bounds": ("space: {train.head.learning_rate: {loguniform: [0, 1]}}\n", "loguniform needs low > 0"),
        "not a distribution": ("space: {train.head.learning_rate: 0.1}\n", "must be one of uniform, quniform"),
        "bad scheduler": ("scheduler: hyperband\nspace: {train.head.epochs: {choice: [1]}}\n",
                          "scheduler='hyperband': Input should be 'asha' or 'none'"),
        "no space": ("trials: 2\n", "space: Field required"),
        "bad yaml": ("space: {train.head.epochs: [1\n", "invalid YAML"),
    }
    # In this process (no subprocess start-up per case); the search itself must never be reached.
    monkeypatch.setattr("job.tune.run_search", lambda *a: pytest.fail("the search started on a bad file"))
    for name, (text, expected) in cases.items():
        spec = _write(tmp_path / "search.yaml", text)
        status = main(["tune", str(REPO / "configs" / "tiny.yaml"), spec, f"workdir={tmp_path / 'run'}"])
        line = capsys.readouterr().err.strip()
        assert status == 2 and "\n" not in line and line.startswith("error: search file "), (name, line)
        assert expected in line, (name, line)
        assert not (tmp_path / "run").exists(), name


@pytest.mark.slow
def test_the_search_writes_a_row_per_trial_and_asha_stops_the_bad_ones(search):
    tmp, result, _ = search
    assert result.returncode == 0, result.stderr[-5000:]
    with open(tmp / "run" / "tune" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["trial"] for row in rows] == [f"trial_0000{i}" for i in range(4)], rows
    good = [row for row in rows if float(row["train.head.learning_rate"]) == GOOD]
    bad = [row for row in rows if float(row["train.head.learning_rate"]) == BAD]
    assert len(good) == len(bad) == 2
    assert all(row["ended"] == "finished" and row["validations"] == "2" for row in good), rows
    assert all(row["ended"] == "stopped" and row["stopped_early"] == "True" and row["validations"] == "1"
               for row in bad), rows
    assert min(float(row["best_val_accuracy"]) for row in good) > max(float(row["best_val_accuracy"]) for row in bad)
    for row in rows:  # each trial is an ordinary run in its own workdir
        assert (tmp / "run" / "tune" / row["trial"] / "checkpoints" / "checkpoint").is_file()
        assert not (tmp / "run" / "tune" / row["trial"] / "export").exists()  # trials are not exported
    assert list((tmp / "run" / "tune").glob("trial_0000*/tensorboard/validation/events.*"))
    table = result.stderr[result.stderr.index("all trials:"):]
    assert "stopped early" in table and table.count("finished") == 2, table


@pytest.mark.slow
def test_best_yaml_trains_as_it_is(search, real_weights):
    tmp, result, args = search
    assert result.returncode == 0, result.stderr[-5000:]
    best = tmp / "run" / "tune" / "best.yaml"
    config = yaml.safe_load(best.read_text())
    assert config["train"]["head"]["learning_rate"] == GOOD and config["workdir"] == str(tmp / "run" / "tune" / "best")
    trained = run_job("train", str(best), env=real_weights, check=True)
    assert '"status": "finished"' in trained.stdout
