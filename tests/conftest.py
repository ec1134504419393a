"""Session-wide fixtures: real assets are located once and must exist (no silent skips)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hub: everything is local or in the mirror.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align.assets import DEFAULT_MODEL_ID, resolve_model, shared_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared with the real data. Missing -> the test fails loudly (never skips)."""
    path = shared_dir()
    assert (path / "data" / "hh-rlhf").is_dir(), (
        f"real data not found at {path}; put ../shared beside the project or set ALIGN_SHARED"
    )
    return path


@pytest.fixture(scope="session")
def hh_root(shared) -> Path:
    return shared / "data" / "hh-rlhf"


@pytest.fixture(scope="session")
def real_model_path() -> str:
    path = resolve_model(DEFAULT_MODEL_ID)
    assert Path(path).is_dir(), (
        f"{DEFAULT_MODEL_ID} is not prepared (resolved to {path!r}); run scripts/setup.sh "
        "or `align prepare-assets`"
    )
    return path


@pytest.fixture(scope="session")
def real_model(real_model_path):
    """The real SmolLM2-135M-Instruct, loaded once per test session."""
    from align.config import ModelConfig
    from align.models import load_base

    return load_base(ModelConfig(name=real_model_path))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from align.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    from align.config import ModelConfig
    from align.models import load_base

    return load_base(ModelConfig(name=tiny_model_path))


@pytest.fixture(scope="session")
def real_dpo_run(real_model_path, shared, tmp_path_factory) -> Path:
    """A short real `align dpo` run (8 real HH pairs, 3 passes), shared by DPO and export tests."""
    from align.config import load_config
    from align.dpo import run_dpo

    out = tmp_path_factory.mktemp("real-runs")
    cfg = load_config("dpo", "configs/dpo_hh_rlhf.yaml", [
        "data.max_train_pairs=8", "data.max_eval_pairs=8", "train.batch_size=8", "train.epochs=3",
        "train.warmup_ratio=0", "train.max_length=128", "train.max_prompt_length=64",
        f"run.output_dir={out}", "run.name=real-dpo", "run.plot=false"])
    run_dpo(cfg)
    return out / "real-dpo"
