import pytest

from align.assets import DEFAULT_MODEL_ID, resolve_model
from align.config import LoraConfig, ModelConfig
from align.chat import greedy_generate
from align.models import add_policy_adapter, live_copies, load_base


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
    copies = live_copies(base.get_input_embeddings().weight)
    model = add_policy_adapter(base, LoraConfig(r=4))
    assert live_copies(model.get_input_embeddings().weight) == copies
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


def test_live_copies_sees_a_base_loaded_anywhere_in_the_process(tiny_model_path):
    """The copy counter looks at every live tensor: a second load, a deep copy, a bf16 copy each
    count, wherever they are held (a module-tree count missed a separately loaded model)."""
    import copy

    import torch

    from align.config import ModelConfig

    base, _ = load_base(ModelConfig(name=tiny_model_path))
    emb = base.get_input_embeddings().weight
    n = live_copies(emb)
    elsewhere = {"model": load_base(ModelConfig(name=tiny_model_path))[0]}
    assert live_copies(emb) == n + 1
    twin = copy.deepcopy(base).to(torch.bfloat16)
    assert live_copies(emb) == n + 2
    del elsewhere, twin
    assert live_copies(emb) == n
