import subprocess
import sys

import pytest

from align.config import ConfigError, load_config


def test_defaults_and_file(tmp_path):
    cfg = load_config("dpo", "configs/dpo_hh_rlhf.yaml")
    assert cfg.lora.r == 8 and cfg.lora.target_modules == "all-linear"
    assert cfg.data.eval_subsets == ["helpful-base"]
    assert cfg.train.learning_rate == pytest.approx(5e-4)


def test_overrides_parse_types():
    cfg = load_config("dpo", None, ["lora.r=4", "train.learning_rate=1e-4",
                                    "data.train_subsets=[harmless-base]", "evaluate=false"])
    assert cfg.lora.r == 4 and cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.data.train_subsets == ["harmless-base"] and cfg.evaluate is False


def test_int_accepted_for_float():
    assert load_config("dpo", None, ["train.beta=1"]).train.beta == 1.0


@pytest.mark.parametrize("override, key", [
    ("train.learnin_rate=1e-4", "train.learnin_rate"),
    ("lora.rank=4", "lora.rank"),
    ("nosuch=1", "nosuch"),
])
def test_unknown_key_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config("dpo", None, [override])


@pytest.mark.parametrize("override, key", [
    ("lora.r=eight", "lora.r"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("data.train_subsets=helpful-base", "data.train_subsets"),
    ("evaluate=3", "evaluate"),
])
def test_wrong_type_named(override, key):
    with pytest.raises(ConfigError, match=f"key '{key}' expects"):
        load_config("dpo", None, [override])


@pytest.mark.parametrize("override, key", [
    ("lora.r=0", "lora.r"), ("lora.alpha=-1", "lora.alpha"),
    ("train.batch_size=0", "train.batch_size"), ("train.learning_rate=0", "train.learning_rate"),
])
def test_bad_values_named(override, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config("dpo", None, [override])


def test_yaml_file_errors_name_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  bta: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.bta'"):
        load_config("dpo", bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("dpo", tmp_path / "missing.yaml")


def test_cli_help_and_config_error():
    out = subprocess.run([sys.executable, "-m", "align.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "dpo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "align.cli", "dpo", "lora.rnk=4"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "lora.rnk" in out.stderr
