"""vLLM hosting the LoRA policy: engine and trainer decode alike across successive adapter
versions, a stale adapter is caught, and server mode serves an adapter on loopback -- for both
sync strategies (a swapped-in LoRA adapter; the adapter merged into the engine's weights).
One engine per sync strategy (start-up costs ~30 s on this CPU)."""
import copy

import pytest
import torch

from align.config import LoraConfig
from align.ppo.actor_critic import ActorCritic
from align.rollout.base import SamplingConfig

pytestmark = pytest.mark.vllm
PROMPTS = ["Tell me about bread.", "What is the capital of France?", "Say something kind."]


@pytest.fixture(scope="module")
def tiny_ac(tiny_model):
    base, tok = tiny_model
    return ActorCritic(copy.deepcopy(base), LoraConfig(r=8), with_critic=False), tok


@pytest.fixture(scope="module", params=["lora", "merged"])
def engine(request, tiny_ac, tiny_model_path):
    from align.rollout.vllm_engine import VLLMEngine

    ac, tok = tiny_ac
    eng = VLLMEngine(tiny_model_path, tok, max_lora_rank=8, sync=request.param,
                     base_name=tiny_model_path)
    yield eng
    eng.close()


def _update(ac, seed):
    """Stand-in for an optimizer step: new adapter weights."""
    g = torch.Generator().manual_seed(seed)
    for n, w in ac.model.named_parameters():
        if "lora_" in n:
            w.data.normal_(0, 0.3, generator=g)


def test_parity_across_successive_adapter_versions(engine, tiny_ac):
    from align.rollout.parity import check_parity

    ac, tok = tiny_ac
    outputs = []
    for version in (1, 2, 3):
        _update(ac, version)
        engine.sync(ac.model, version)
        res = check_parity(engine, ac.model, tok, PROMPTS)
        assert res["mismatches"] == [], res
        ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for p in PROMPTS]
        outputs.append([c.token_ids for c in engine.generate(ids, SamplingConfig(16, greedy=True))])
    assert outputs[0] != outputs[2]  # the versions really differ, so parity is not trivial
    if engine.sync_mode == "lora":
        assert engine.llm.llm_engine.list_loras() == {4}  # only the current version is resident
    assert max(engine.stats.sync_seconds) < 5.0


def test_stale_adapter_is_caught(engine, tiny_ac):
    from align.rollout.parity import check_parity

    ac, tok = tiny_ac
    _update(ac, 10)
    engine.sync(ac.model, 10)
    _update(ac, 11)  # the trainer moved on, the engine was not synced
    assert check_parity(engine, ac.model, tok, PROMPTS)["mismatches"]


def test_sampled_logprobs_match_trainer(engine, tiny_ac):
    from align.ppo.experience import collate

    ac, tok = tiny_ac
    _update(ac, 20)
    engine.sync(ac.model, 20)
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for p in PROMPTS]
    comps = engine.generate(ids, SamplingConfig(12, temperature=1.0, seed=0))
    tb = collate(comps, tok.pad_token_id)
    mask = tb.mask
    with torch.no_grad(), ac.role("policy"):
        logp, _ = ac.token_logprobs(tb)
    eng = torch.zeros_like(logp)
    for i, c in enumerate(comps):
        eng[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
    assert float(((eng - logp).abs() * mask).max()) < 1e-3


def test_server_mode_serves_adapter_on_loopback(tiny_ac, tiny_model_path):
    """`vllm serve` in its own process: starts, refuses requests without its API key, loads the
    adapter at runtime, decodes like the trainer, and is gone after close()."""
    import urllib.error
    import urllib.request

    from align.rollout.parity import check_parity
    from align.rollout.vllm_server import VLLMServerEngine

    ac, tok = tiny_ac
    _update(ac, 30)
    server = VLLMServerEngine(tiny_model_path, tok, base_name=tiny_model_path)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as err:  # no API key, no service
            urllib.request.urlopen(f"{server.url}/v1/models", timeout=10)
        assert err.value.code == 401
        server.sync(ac.model, 1)
        assert check_parity(server, ac.model, tok, PROMPTS)["mismatches"] == []
        _update(ac, 31)
        server.sync(ac.model, 2)  # a second version replaces the first
        assert check_parity(server, ac.model, tok, PROMPTS)["mismatches"] == []
    finally:
        server.close()
    assert server.proc.poll() is not None


@pytest.mark.parametrize("sync", ["lora", "merged"])
def test_a_bf16_engine_decodes_like_the_trainer_within_bf16_rounding(sync, tiny_ac, tiny_model_path):
    """``auto`` picks bf16 on a CPU with native bf16, where vLLM packs bf16 weights for its own
    (AMX) kernels. The engine in bf16 -- here beside an fp32 trainer, whose merged weights it
    must take in its own dtype -- decodes like the trainer up to bf16 near-ties (the guard's
    TIE_MARGIN), and a stale adapter is still caught at that margin."""
    from align.rollout.parity import TIE_MARGIN, check_parity
    from align.rollout.vllm_engine import VLLMEngine

    ac, tok = tiny_ac
    eng = VLLMEngine(tiny_model_path, tok, max_lora_rank=8, sync=sync, base_name=tiny_model_path, dtype="bfloat16")
    try:
        _update(ac, 40)
        eng.sync(ac.model, 1)
        res = check_parity(eng, ac.model, tok, PROMPTS, tie_margin=TIE_MARGIN["bfloat16"])
        assert res["mismatches"] == [], res
        _update(ac, 41)  # the trainer moved on, the engine was not synced
        assert check_parity(eng, ac.model, tok, PROMPTS, tie_margin=TIE_MARGIN["bfloat16"])["mismatches"]
    finally:
        eng.close()
