"""The architecture matrix: tiny random models of the families users bring (built offline from
configs), each through the places that could assume Llama -- packed DPO scoring under every
attention backend this machine has, policy/reference/critic roles on one base, all-linear LoRA
targets, export and reload with plain transformers/PEFT, and vLLM parity: both sync modes of the
in-process engine where vLLM has a model of its own for the architecture, and the vllm-server
engine (its own process, one server per architecture) where it has not -- no case is skipped."""
from __future__ import annotations

import copy

import pytest
import torch

from align.config import LoraConfig, ModelConfig
from align.scoring.pairs import PACKED_KEYS, PackedPairCollator, install_packed_forward
from align.models import add_policy_adapter, live_copies, load_base, reference_mode
from align.tiny import ARCHITECTURES, make_tiny_model

ARCHS = list(ARCHITECTURES)
# vLLM 0.32 has no native model for these: it runs its transformers fallback, which patches
# transformers in the process it runs in -- refused in-process, served by rollout.engine=vllm-server
FALLBACK = {"gpt_neox", "olmo2"}
VLLM_CASES = [(a, "vllm", sync) for a in ARCHS if a not in FALLBACK for sync in ("lora", "merged")] + \
    [(a, "vllm-server", "lora") for a in ARCHS if a in FALLBACK]
# fp32 summation-order noise (Gemma's scaled embeddings reach ~1e-4 on log-probs of ~5); the
# defects this guards against are ~0.2 nats (eager's boolean mask) or worse.
TOL = dict(atol=2e-4, rtol=1e-4)
EXAMPLES = [
    {"prompt_ids": [5, 6, 7, 8, 9, 10], "chosen_ids": [11, 12, 13], "rejected_ids": [14, 15]},
    {"prompt_ids": [20, 21], "chosen_ids": [22], "rejected_ids": [23, 24, 25, 26]},
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {arch: str(make_tiny_model(root / arch, arch=arch, seed=1)) for arch in ARCHS}


def _policy(path, attention="auto", seed=0):
    base, tok = load_base(ModelConfig(name=path, dtype="float32", attention=attention))
    model = add_policy_adapter(base, LoraConfig(r=4))
    torch.manual_seed(seed)
    for n, w in model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.2)  # a trained-looking adapter: "adapter off" is a real change
    return model, tok


def _packed_vs_rows(model, tok):
    """Log-probs of the answers from the packed forward, and from ordinary separate rows."""
    install_packed_forward(model.get_base_model())
    batch = PackedPairCollator(pad_token_id=tok.pad_token_id, max_length=64, max_prompt_length=32)(EXAMPLES)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                       fused_lm_head=True, **{k: batch[k] for k in PACKED_KEYS}).log_probs
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return packed, rows * (labels[:, 1:] != -100)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_pairs_equal_separate_rows(paths, arch, attention):
    if arch == "gemma2" and attention == "sdpa":
        with pytest.raises(Exception, match="sdpa would drop Gemma2Config's attention logit softcapping"):
            _policy(paths[arch], attention)
        return
    model, tok = _policy(paths[arch], attention)
    assert model.get_base_model().config._attn_implementation == attention
    packed, rows = _packed_vs_rows(model, tok)
    torch.testing.assert_close(packed, rows, **TOL)
    with reference_mode(model):
        packed_ref, rows_ref = _packed_vs_rows(model, tok)
    torch.testing.assert_close(packed_ref, rows_ref, **TOL)
    assert (packed - packed_ref).abs().max() > 1e-3  # the adapter really changes the scores


def test_backend_without_custom_masks_falls_back_to_rows(paths, capsys):
    """flex_attention takes no 4-D tensor mask: the pairs are scored as two rows, exactly, and
    a notice says so -- never a silently different number."""
    model, tok = _policy(paths["llama"], "flex_attention")
    packed, rows = _packed_vs_rows(model, tok)
    torch.testing.assert_close(packed, rows, **TOL)
    assert "attention backend 'flex_attention' takes no custom 4-D mask" in capsys.readouterr().out


def test_sliding_window_shorter_than_a_row_falls_back_to_rows(tmp_path, capsys):
    """A user-supplied 4-D mask replaces the model's sliding-window mask; with rows longer than
    the window, packing would let tokens see past it. Those batches are scored as rows."""
    path = str(make_tiny_model(tmp_path / "m", arch="mistral", sliding_window=4))
    model, tok = _policy(path)
    packed, rows = _packed_vs_rows(model, tok)
    torch.testing.assert_close(packed, rows, **TOL)
    assert "sliding window (4) is shorter than a row" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ARCHS)
def test_roles_on_one_base_and_lora_on_every_linear(paths, arch):
    from align.ppo.actor_critic import ActorCritic

    base, _ = load_base(ModelConfig(name=paths[arch], dtype="float32"))
    frozen = copy.deepcopy(base)  # the test's own reference copy
    copies = live_copies(base.get_input_embeddings().weight)
    ac = ActorCritic(base, LoraConfig(r=4), with_critic=True)
    for n, w in ac.model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), ac.role("reference"):
        ref = ac.model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(ref, frozen(input_ids=ids).logits)  # reference == base, exactly
        assert not torch.equal(ac.model(input_ids=ids).logits, ref)
    assert live_copies(base.get_input_embeddings().weight) == copies  # policy, critic, reference: no new copy
    from peft.tuners.lora import LoraLayer

    out_emb = ac.model.get_base_model().get_output_embeddings()
    linears = {n for n, m in ac.model.get_base_model().named_modules()
               if isinstance(m, torch.nn.Linear) and m is not out_emb and ".lora_" not in n
               and not n.endswith("base_layer") and "value_head" not in n}
    wrapped = {n for n, m in ac.model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert linears - wrapped == set() and len(wrapped) >= 4 * 2, sorted(linears - wrapped)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_and_merged_export_reload_in_plain_transformers(paths, arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.adapters import save_adapter
    from align.export import export

    model, _ = _policy(paths[arch])
    save_adapter(model, tmp_path / "adapter", paths[arch])
    export(tmp_path / "adapter", tmp_path / "a", vllm_check=False)
    export(tmp_path / "adapter", tmp_path / "m", merge=True, vllm_check=False)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    attention = model.get_base_model().config._attn_implementation  # eager for Gemma-2 (softcapping)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths[arch], attn_implementation=attention),
                                      str(tmp_path / "a"))
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation=attention)
        torch.testing.assert_close(a(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.vllm
def test_in_process_vllm_refuses_exactly_the_fallback_architectures(paths):
    from align.rollout.vllm_engine import EngineStartError, _refuse_transformers_fallback

    for arch in ARCHS:
        if arch in FALLBACK:
            with pytest.raises(EngineStartError, match="rollout.engine=vllm-server"):
                _refuse_transformers_fallback(paths[arch], "lora")
        else:
            _refuse_transformers_fallback(paths[arch], "lora")


@pytest.mark.vllm
@pytest.mark.parametrize("arch, engine_name, sync", VLLM_CASES, ids=[f"{a}-{e}-{s}" for a, e, s in VLLM_CASES])
def test_vllm_serves_the_policy_like_the_trainer(paths, arch, engine_name, sync):
    from align.ppo.experience import collate
    from align.rollout.base import SamplingConfig
    from align.rollout.parity import check_parity
    from align.rollout.vllm_engine import VLLMEngine
    from align.rollout.vllm_server import VLLMServerEngine

    model, tok = _policy(paths[arch], seed=3)
    for n, w in model.named_parameters():
        if "lora_" in n:
            w.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
    if engine_name == "vllm":
        engine = VLLMEngine(paths[arch], tok, max_lora_rank=8, sync=sync, base_name=paths[arch])
    else:
        engine = VLLMServerEngine(paths[arch], tok, max_lora_rank=8, max_model_len=256, base_name=paths[arch])
    try:
        engine.sync(model, 1)
        prompts = ["Tell me about bread.", "What is the capital of France?"]
        assert check_parity(engine, model, tok, prompts)["mismatches"] == []
        from align.chat import prompt_ids

        comps = engine.generate([prompt_ids(tok, p) for p in prompts], SamplingConfig(8, temperature=1.0, seed=0))
        tb = collate(comps, tok.pad_token_id)
        x, attn, pos, tgt, mask = tb.input_ids, tb.attention_mask, tb.pred_pos, tb.targets, tb.mask
        with torch.no_grad():
            h = model.get_base_model().base_model(input_ids=x, attention_mask=attn).last_hidden_state
            h = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.size(-1)))
            logp = model.get_base_model().get_output_embeddings()(h).float().log_softmax(-1)
            logp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        eng = torch.zeros_like(logp)
        for i, c in enumerate(comps):
            eng[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
        assert float(((eng - logp).abs() * mask).max()) < 1e-3
    finally:
        engine.close()
