"""The config schema: defaults, YAML files, dotted overrides, one-line errors."""

from pathlib import Path

import pytest

from job.config import ConfigError, dump_config, load_config, parse_override

# configs/tune_*.yaml are search files of `python -m job tune` (tests/test_tune.py checks them).
CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/*.yaml")
                 if not p.name.startswith("tune_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(str(path))
    assert config.workdir


def test_overrides_are_typed_and_keep_sibling_defaults():
    config = load_config(None, ["train.batch_size=128", "train.head.augment=none", "model.weights=none"])
    assert config.train.batch_size == 128
    assert config.train.head.augment == "none"
    assert config.train.head.learning_rate == 1e-3  # untouched sibling keeps its default
    assert config.model.weights == "none"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  image_size: 128\ntrain:\n  precision: mixed_bfloat16\n")
    config = load_config(str(path), ["model.image_size=160"])
    assert config.model.image_size == 160 and config.train.precision == "mixed_bfloat16"


def test_dump_round_trips(tmp_path):
    config = load_config(None, ["train.finetune.unfreeze=40", "telemetry.profile_steps=[3,5]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(str(path)) == config


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.image_size=16", "model.image_size=16: Input should be greater than or equal to 32"),
        ("train.batch_size=abc", "train.batch_size='abc'"),
        ("train.precision=fp8", "'float32', 'mixed_float16' or 'mixed_bfloat16'"),
        ("train.strategy=tpu", "train.strategy='tpu'"),
        ("model.weights=weights.bin", "must be 'imagenet', 'none' or a path"),
        ("trian.batch_size=1", "trian: unknown setting"),
        ("train.cache_features=true", "needs train.head.augment='none'"),
        ("telemetry.profile_steps=[5,2]", "telemetry.profile_steps"),
        ("train.finetune.cache_frozen=true", "needs train.finetune.unfreeze=N"),
        ("data.sharpen_size=4", "data.sharpen_size=4: must be odd"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_settings_give_one_line_naming_the_setting(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_on_off_is_a_bool():
    assert parse_override("train.cache_features=off") == ("train.cache_features", False)
    assert load_config(None, ["train.cache_features=off"]).train.cache_features is False


def test_command_line_takes_overrides_before_and_after_options():
    from job.__main__ import parse_command_line

    args = parse_command_line(["benchmark", "c.yaml", "workdir=w", "--phase", "finetune", "train.batch_size=8"])
    assert (args.config, args.phase, args.overrides) == ("c.yaml", "finetune", ["workdir=w", "train.batch_size=8"])
    with pytest.raises(SystemExit):
        parse_command_line(["benchmark", "c.yaml", "--phase", "finetune", "--no-such-flag"])
