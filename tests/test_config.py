import subprocess
import sys
from pathlib import Path

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
    ("lora.alpha=sixteen", "lora.alpha"),  # (lora.r takes a word, full: test_full_finetuning.py)
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


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_overrides_may_follow_options():
    """README: `align config dpo --config configs/dpo_hh_rlhf.yaml lora.r=4` (argparse alone refuses it)."""
    out = _cli("config", "dpo", "--config", "configs/dpo_hh_rlhf.yaml", "lora.r=4")
    assert out.returncode == 0, out.stderr
    assert "  r: 4\n" in out.stdout
    out = _cli("config", "dpo", "--config", "configs/dpo_hh_rlhf.yaml", "--bogus")
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr


@pytest.mark.parametrize("job, path", [("dpo", "configs/dpo_hh_rlhf.yaml"), ("rm", "configs/rm_hh_rlhf.yaml")])
def test_shipped_recipes_are_the_defaults(job, path):
    """One source of truth: `align config JOB` prints what `align JOB --config <shipped>` runs."""
    assert load_config(job, path) == load_config(job)


def test_own_prompts_do_not_inherit_the_demo_rows():
    """The IMDB demo's row window and template live in its config, not in the defaults that a
    user's own prompt file gets."""
    demo, default = load_config("ppo", "configs/ppo_imdb_sentiment.yaml"), load_config("ppo")
    assert (demo.data.rows_start, demo.data.rows_stop, demo.data.text_field) == (1200, 2000, "review")
    assert (default.data.rows_start, default.data.rows_stop, default.data.text_field,
            default.data.first_words, default.data.template) == (0, 0, "prompt", 0, "{text}")
    assert default.data.dataset == ""  # your prompts need naming (a clear error otherwise)


def test_dry_run_checks_and_writes_nothing(tmp_path):
    out = _cli("ppo", "--config", str(Path.cwd() / "configs/ppo_imdb_sentiment.yaml"), "--dry-run",
               f"run.output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "dataset: imdb-reviews" in out.stdout and "nothing was written" in out.stderr
    out = _cli("ppo", "--dry-run", "ppo.advantage=vtrace", cwd=tmp_path)
    assert out.returncode == 2 and "ppo.advantage" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_key_is_explained_from_its_comment():
    """`align config JOB --explain`: each key's meaning (the comments above it in config.py, the
    one place keys are documented) and its declared range; the YAML stays the same config."""
    import dataclasses

    import yaml

    from align.config import dump_explained, dump_yaml, explain, field_docs

    for job in ("dpo", "ppo", "rm"):
        cfg = load_config(job, None, ["data.dataset=arithmetic"] if job == "ppo" else [])
        rows = explain(cfg)
        assert [k for k, _, doc, _ in rows if not doc] == [], job
        text = dump_explained(cfg)
        assert yaml.safe_load(text) == yaml.safe_load(dump_yaml(cfg))
        assert text.count("\n  #") >= len(rows)
    assert "# Dropout on the LoRA input" in dump_explained(load_config("dpo"))
    assert "one of sigmoid, hinge, ipo" in " ".join(dump_explained(load_config("dpo")).replace("#", "").split())

    @dataclasses.dataclass
    class Section:
        # documented above
        a: int = 1
        b: int = 2  # documented beside
        c: int = 3

    assert field_docs(Section) == {"a": "documented above", "b": "documented beside", "c": ""}


def test_config_explain_on_the_command_line(capsys):
    from align.cli import main

    assert main(["config", "rm", "--explain", "train.learning_rate=1e-4"]) == 0
    out = capsys.readouterr().out
    assert "# The reward adapter's (and score head's) learning rate. [> 0 and <= 1.0]\n  learning_rate: 0.0001" in out
