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


@pytest.fixture(scope="session", autouse=True)
def float32_where_the_machine_would_pick_bf16():
    """``model.dtype: auto`` resolves as on a CPU without native bf16, on every machine: the
    suite's exact equalities (packed == separate rows, two processes == one, hand computations)
    are float32's, and CI machines differ (an AVX2 EPYC picks fp32, a Xeon with AMX bf16). The
    bf16 path is tested where it is asked for by name (test_dtype.py, test_vllm.py's bf16 engine);
    a test's own monkeypatch of ``cpu_bf16_feature`` still wins. Subprocess tests pass
    ``model.dtype=float32`` themselves."""
    import align.placement

    real = align.placement.cpu_bf16_feature

    def no_native_bf16_here(cpuinfo: str = "/proc/cpuinfo"):
        return None if cpuinfo == "/proc/cpuinfo" else real(cpuinfo)  # other files read as written

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(align.placement, "cpu_bf16_feature", no_native_bf16_here)
        yield


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
def tiny_adapter(tiny_model, tmp_path_factory):
    """A PEFT adapter folder (r=4, untrained) on the tiny model, as any run writes it."""
    import copy

    from align.adapters import save_adapter
    from align.config import LoraConfig
    from align.models import add_policy_adapter

    base, _ = tiny_model
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(add_policy_adapter(copy.deepcopy(base), LoraConfig(r=4)), out, base.name_or_path)
    return out


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


@pytest.fixture(scope="session")
def implicit_margins_by_hand():
    """``(base_path, adapter_dir, rows, beta, max_length, max_prompt_length) -> [margin, ...]``:
    each pair's implicit-reward margin beta * ((log pi - log ref)(chosen) - (same)(rejected)),
    computed the plain way -- every answer in its own unpadded row, the reference as PEFT's
    adapter switched off, truncated as DPO truncates (the prompt's last tokens, each answer's
    first) -- to check the packed scorer's accuracies against, not against themselves."""
    import torch

    def compute(base_path, adapter_dir, rows, beta, max_length=1 << 30, max_prompt_length=1 << 30):
        from peft import PeftModel

        from align.chat import tokenize_pair
        from align.config import ModelConfig
        from align.models import load_base

        base, tok = load_base(ModelConfig(name=str(base_path), dtype="float32"))
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()

        def answer_logp(prompt, answer):
            ids = torch.tensor([prompt + answer])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            picked = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
            return float(picked[len(prompt) - 1:].sum())

        margins = []
        with torch.no_grad():
            for row in rows:
                t = tokenize_pair(tok, row)
                p = t["prompt_ids"][-max_prompt_length:]
                budget = max(1, max_length - len(p))
                r = []
                for key in ("chosen_ids", "rejected_ids"):
                    a = t[key][:budget]
                    pol = answer_logp(p, a)
                    with model.disable_adapter():
                        ref = answer_logp(p, a)
                    r.append(beta * (pol - ref))
                margins.append(r[0] - r[1])
        return margins

    return compute


def accuracy_with_ties(margins, tie: float = 1e-4):
    """Share of margins > 0, a near-zero margin (float noise between two ways of scoring) 1/2."""
    return sum(1.0 if m > tie else 0.5 if abs(m) <= tie else 0.0 for m in margins) / len(margins)
