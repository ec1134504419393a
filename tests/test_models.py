import pytest

from align.assets import DEFAULT_MODEL_ID, resolve_model
from align.config import LoraConfig, ModelConfig
from align.chat import greedy_generate
from align.models import add_policy_adapter, count_base_copies, load_base


def test_default_model_resolves_offline(real_model_path):
    assert resolve_model(DEFAULT_MODEL_ID) == real_model_path


def test_real_model_greedy_answer(real_model):
    model, tok = real_model
    answer = greedy_generate(model, tok, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer, answer


def test_tiny_model_roles_share_one_base(tiny_model):
    import copy
    base, tok = tiny_model
    base = copy.deepcopy(base)
    model = add_policy_adapter(base, LoraConfig(r=4))
    assert count_base_copies(model) == 1
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # all-linear: attention *and* MLP projections carry LoRA weights
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(proj in n and "lora_A" in n for n in names), proj
    assert not any("embed_tokens" in n for n in names)


def test_unknown_model_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not found in the mirror"):
        load_base(ModelConfig(name="nobody/no-such-model"))


def test_mistyped_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    """No minute of Hub-client retries before the mirror hint."""
    import time

    from align import assets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # a name that never resolves
    assets.hub_reachable.cache_clear()
    t = time.monotonic()
    try:
        with pytest.raises(FileNotFoundError, match="not found in the mirror"):
            load_base(ModelConfig(name="nobody/typo-model"))
    finally:
        assets.hub_reachable.cache_clear()
    assert time.monotonic() - t < 10
