from __future__ import annotations

import pytest
import yaml

from bonnerlab.config import (
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_config,
    save_yaml,
    to_dict,
)
from bonnerlab.errors import ConfigError


def test_dotted_flags_set_nested_fields():
    cfg = parse_config(
        TrainConfig, ["--optim.lr", "0.05", "--data.batch_size", "256", "--model.arch", "resnet18"]
    )
    assert cfg.optim.lr == 0.05
    assert cfg.data.batch_size == 256
    assert cfg.model.arch == "resnet18"
    assert cfg.epochs == TrainConfig().epochs


def test_precedence_defaults_yaml_cli(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"epochs": 7, "optim": {"lr": 0.5, "optimizer": "sgd"}}))
    cfg = parse_config(TrainConfig, ["--config_path", str(path), "--optim.lr", "0.1"])
    assert cfg.epochs == 7  # YAML beats default
    assert cfg.optim.optimizer == "sgd"
    assert cfg.optim.lr == 0.1  # CLI beats YAML
    assert cfg.data.dataset == "digits"  # default kept


def test_saved_config_reproduces_run(tmp_path):
    cfg = parse_config(TrainConfig, ["--optim.lr", "0.07", "--data.augment", "none", "--seed", "3"])
    save_yaml(cfg, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml") == cfg
    assert parse_config(TrainConfig, ["--config_path", str(tmp_path / "config.yaml")]) == cfg


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lrr": 0.1}}))
    with pytest.raises(ConfigError, match="optim.lrr"):
        parse_config(TrainConfig, ["--config_path", str(path)])


def test_unknown_flag_and_wrong_type_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(TrainConfig, ["--optim.lrr", "0.1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        parse_config(TrainConfig, ["--epochs", "three"])
    assert e.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.lr": 0.0}, "optim.lr must be > 0"),
        ({"optim.lr": -1.0}, "optim.lr must be > 0"),
        ({"data.batch_size": 0}, "data.batch_size must be > 0"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"data.dataset": "cifar"}, "data.dataset must be one of"),
        ({"optim.optimizer": "lion"}, "optim.optimizer must be one of"),
        ({"data.val_fraction": 1.5}, "val_fraction"),
        ({"epochs": "3"}, "expected an integer"),
        ({"data.augment": "yes"}, "data.augment must be one of auto, digits, natural, none"),
        ({"model.sync_batchnorm": "yes"}, "expected true or false"),
        ({"optim.accumulate_steps": 0}, "optim.accumulate_steps must be >= 1"),
        ({"data.crop_scale": 0}, r"data.crop_scale must be in \(0, 1\]"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), overrides)


def test_bad_value_on_command_line_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        parse_config(TrainConfig, ["--optim.lr", "-0.1"])


def test_from_dict_roundtrip_and_int_to_float():
    d = to_dict(TrainConfig())
    d["optim"]["lr"] = 1  # YAML writes 1.0 as 1 sometimes: an int is a valid float
    cfg = from_dict(TrainConfig, d)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


def test_help_shows_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"])
    out = capsys.readouterr().out
    assert "--optim.lr" in out and "peak learning rate" in out
    assert "--data.batch_size" in out and "global batch size" in out


def test_configs_saved_before_a_rename_still_load(tmp_path):
    """data.channels and extract's image_channels became in_channels: a run's config.yaml (what
    --resume and a checkpoint hold) and an old YAML file still read, with the value kept."""
    from bonnerlab.config import ExtractConfig

    old = to_dict(TrainConfig())
    del old["data"]["in_channels"]
    old["data"]["channels"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_config(TrainConfig, tmp_path / "config.yaml").data.in_channels == 3
    assert from_dict(ExtractConfig, {"image_channels": 1}).in_channels == 1
    with pytest.raises(ConfigError, match="unknown config key"):  # both names: one is unknown
        from_dict(ExtractConfig, {"image_channels": 1, "in_channels": 3})


def test_the_newest_run_is_spelled_newest():
    from bonnerlab.config import EvaluateConfig, ExtractConfig

    assert EvaluateConfig().checkpoint == "newest"
    for cls in (EvaluateConfig, ExtractConfig):
        with pytest.raises(ConfigError, match="the newest run is --checkpoint newest"):
            cls(checkpoint="latest")


@pytest.mark.parametrize(
    "text, yaml11",
    [("1e-3", str), ("1.0e3", str), ("5E4", str), ("2e+2", str), (".5e-1", float), ("0.02", float)],
)
def test_yaml_floats_in_exponent_form_are_floats(tmp_path, text, yaml11):
    """PyYAML's YAML 1.1 resolver reads `lr: 1e-3` as the string '1e-3' (yaml.safe_load, the
    `yaml11` column); the config loader reads YAML 1.2's floats, as Python's float() does."""
    path = tmp_path / "run.yaml"
    path.write_text(f"optim:\n  lr: {text}\n")
    assert type(yaml.safe_load(path.read_text())["optim"]["lr"]) is yaml11
    assert load_config(TrainConfig, path).optim.lr == float(text)
    assert parse_config(TrainConfig, ["--config_path", str(path)]).optim.lr == float(text)


def test_yaml_integers_strings_and_merges_are_as_yaml_reads_them():
    from bonnerlab.config.core import parse_yaml

    text = "a: 12\nb: '1e-3'\nc: 1e3x\nd: 1_000\nbase: &b {x: 1, y: 2}\ne:\n  <<: *b\n  x: 3\n"
    assert parse_yaml(text) == yaml.safe_load(text)  # nothing changes but exponent floats
    assert parse_yaml("[1e-3, 2E5]") == [float("1e-3"), float("2E5")]
    assert yaml.safe_load("[1e-3]") == ["1e-3"]  # the class of PyYAML's own loader is untouched


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("epochs: 2\nseed: 1\nepochs: 3\n", "epochs", "lines 1 and 3"),
        ("optim:\n  lr: 0.1\n  optimizer: sgd\n  lr: 0.2\n", "lr", "lines 2 and 4"),
    ],
)
def test_a_duplicate_yaml_key_is_one_line_naming_key_and_file(tmp_path, text, key, lines):
    from bonnerlab.cluster.sweeps import load_sweep_file

    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)  # PyYAML itself keeps the last value, silently
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, path)
    assert str(e.value) == f"config file {path}: key {key!r} given twice ({lines})"
    with pytest.raises(ConfigError, match=f"sweep file {path}: key {key!r} given twice"):
        load_sweep_file(path)
