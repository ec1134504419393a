"""Every command in the README and in docs/*.md runs as written, in its cheap form: jobs, ``align eval``,
``align export`` and ``align serve`` with ``--dry-run`` (every flag parsed and checked, the model,
data, adapters, judge and reward found, nothing loaded or written), ``align config`` as is,
scripts with ``--help``. ``runs/<run-name>`` stands for a run the README made earlier. Files the README tells the user to create (shell lines, Python
blocks headed ``# name.py``) are created first, in a scratch folder that stands for the user's
project folder next to a checkout of this repository."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = "\n".join(p.read_text() for p in DOCS)
FULL_TIER = ".venv/bin/python -m pytest -q"
FAST_TIER = '.venv/bin/python -m pytest -q -m "not real and not vllm and not slow"'
SETUP = {"bash scripts/setup.sh", FULL_TIER, " ".join(shlex.split(FAST_TIER))}  # the tiers: run by CI / a developer


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # a command continued with \ is one line
            line = line.strip()
            words = shlex.split(line, comments=True)
            if words and " ".join(words) not in SETUP and words[0] != "source":
                out.append(line)
    return out


COMMANDS = _commands()


def _cheap_form(line: str) -> list[str] | None:
    """The argv that checks ``line`` without running the job (None: a shell line to run)."""
    words = [w.replace("<run-name>", "dpo-hh") for w in shlex.split(line, comments=True)]
    if words[0] == "torchrun":  # the launcher's flags are torchrun's; the job after -m is align's
        return [sys.executable, "-m", "align.cli", *words[words.index("align.cli") + 1:], "--dry-run"]
    if words[:2] == ["accelerate", "launch"]:
        config = words[words.index("--config_file") + 1]
        assert (ROOT / config).is_file(), config
        return [sys.executable, "-m", "align.cli", *words[words.index("align.cli") + 1:], "--dry-run"]
    if words[0] == "align":
        if words[1] in ("dpo", "ppo", "rm"):
            return [sys.executable, "-m", "align.cli", *words[1:], "--dry-run"]
        if words[1] == "config":
            return [sys.executable, "-m", "align.cli", *words[1:]]
        if words[1] in ("eval", "export", "serve"):
            return [sys.executable, "-m", "align.cli", *words[1:], "--dry-run"]
        raise AssertionError(f"README command with no cheap form: {line}")
    if words[0] == "python" and words[1].startswith("scripts/"):
        return [sys.executable, str(ROOT / words[1]), "--help"]
    return None


def _listing(root: Path) -> list[str]:
    import os

    return sorted(os.path.join(d, f) for d, dirs, files in os.walk(root) for f in dirs + files)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The user's folder: the repo's configs/ and scripts/ beside the files the README creates."""
    wd = tmp_path_factory.mktemp("user")
    for name in ("configs", "scripts"):
        (wd / name).symlink_to(ROOT / name)
    for block in _blocks("python"):
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w/]+\.py", first):
            (wd / first[2:]).write_text(block)
    for line in COMMANDS:
        if _cheap_form(line) is None:  # e.g. printf ... > my_prompts.jsonl
            subprocess.run(line, shell=True, cwd=wd, check=True)
    # what earlier README commands leave behind (`align rm run.name=rm-hh`, `align dpo run.name=dpo-hh`...)
    from align.assets import DEFAULT_MODEL_ID

    import torch
    from safetensors.torch import save_file

    for run in ("rm-hh", "rm-hh-b", "dpo-hh", "ppo-hh", "ppo-hh-sum"):
        (wd / "runs" / run / "adapter").mkdir(parents=True)
        (wd / "runs" / run / "adapter" / "adapter_config.json").write_text(
            json.dumps({"r": 8, "lora_alpha": 16, "base_model_name_or_path": DEFAULT_MODEL_ID}))
        save_file({"w": torch.zeros(2)}, wd / "runs" / run / "adapter" / "adapter_model.safetensors")
        (wd / "runs" / run / "config.yaml").write_text(f"model:\n  name: {DEFAULT_MODEL_ID}\nrun:\n  seed: 0\n")
        (wd / "runs" / run / "run.json").write_text(json.dumps({"job": "rm" if run.startswith("rm") else run[:3]}))
    step = wd / "runs" / "ppo-hh-sum" / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    (step / "adapter").symlink_to(wd / "runs" / "ppo-hh-sum" / "adapter")
    return wd


def test_readme_names_both_test_tiers_and_ci_runs_the_full_one():
    readme = (ROOT / "README.md").read_text()
    assert FULL_TIER in readme and FAST_TIER in readme
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "bash scripts/setup.sh" in ci and FULL_TIER in ci
    markers = (ROOT / "pyproject.toml").read_text()
    assert all(f'"{m}:' in markers for m in ("real", "vllm", "slow"))


def test_readme_lists_the_jobs():
    jobs = {shlex.split(c, comments=True)[1] for c in COMMANDS if c.startswith("align ")}
    assert {"dpo", "ppo", "rm", "export", "config"} <= jobs


@pytest.mark.parametrize("line", [c for c in COMMANDS if _cheap_form(c) is not None])
def test_readme_command_runs(line, workdir):
    before = _listing(workdir)
    out = subprocess.run(_cheap_form(line), cwd=workdir, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{line}\n{out.stderr[-3000:]}"
    assert _listing(workdir) == before  # nothing written


def test_readme_python_loading_snippet_runs(real_model, tmp_path, monkeypatch):
    """The 'load an export without align' snippet, against a real adapter and merged export."""
    import copy

    from align.adapters import save_adapter
    from align.assets import DEFAULT_MODEL_ID
    from align.config import LoraConfig
    from align.models import add_policy_adapter

    (snippet,) = [b for b in _blocks("python") if "BASE =" in b]
    base, tok = real_model
    save_adapter(add_policy_adapter(copy.deepcopy(base), LoraConfig(r=2)), tmp_path / "exported" / "my-adapter",
                 DEFAULT_MODEL_ID)
    merged = copy.deepcopy(base)
    merged.save_pretrained(tmp_path / "exported" / "merged")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["model"].peft_config["default"].r == 2 and scope["merged"] is not None
