"""The dtype path (issue 29): ``model.dtype: auto`` decided from the hardware and recorded in the
run, kept on resume; bf16 as GPU users run it -- frozen base in bf16, LoRA weights and optimizer
state in fp32, log-probs in fp32 -- checked for what it must not change (reference == base,
packed == separate rows within bf16's rounding) on tiny models, on this CPU."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from align.config import LoraConfig, ModelConfig, load_config


def _cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return str(path)


def test_cpu_bf16_feature_reads_the_flags(tmp_path):
    from align.placement import cpu_bf16_feature

    assert cpu_bf16_feature(_cpuinfo(tmp_path, "")) is None
    assert cpu_bf16_feature(_cpuinfo(tmp_path, "avx512f avx512_bf16")) == "avx512_bf16"
    assert cpu_bf16_feature(_cpuinfo(tmp_path, "amx_tile amx_bf16 avx512_bf16")) == "amx_bf16"
    assert cpu_bf16_feature(str(tmp_path / "missing")) is None  # unreadable: no native bf16 assumed


@pytest.mark.parametrize("feature, want", [(None, "float32"), ("avx512_bf16", "bfloat16"), ("amx_bf16", "bfloat16")])
def test_auto_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, feature, want):
    import align.placement as models

    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: feature)
    dtype, why = models.auto_dtype("cpu")
    assert dtype == want and (feature or "emulated") in why
    assert models.resolve_dtype("auto", "cpu") == want and models.resolve_dtype("float16", "cpu") == "float16"


def test_a_run_records_its_dtype_and_a_resume_keeps_it(tmp_path, tiny_model_path, monkeypatch, capsys):
    import align.placement as models
    from align.runs import read_manifest, start_run

    monkeypatch.setattr(models, "auto_dtype", lambda device="auto": ("bfloat16", "test: native bf16"))
    over = [f"model.name={tiny_model_path}", f"run.output_dir={tmp_path}", "run.name=r"]
    cfg = load_config("dpo", None, over)
    with start_run(cfg, "dpo") as run:
        run.log({"step": 1})
    assert cfg.model.dtype == "bfloat16" and "dtype: bfloat16 (model.dtype=auto: test: native bf16)" in capsys.readouterr().out
    assert read_manifest(tmp_path / "r")["dtype"] == "bfloat16"
    assert "dtype: auto" in (tmp_path / "r" / "config.yaml").read_text()  # what was asked stays
    (tmp_path / "r" / "checkpoints" / "step-1").mkdir(parents=True)
    monkeypatch.setattr(models, "auto_dtype", lambda device="auto": ("float32", "test: another machine"))
    cfg = load_config("dpo", None, over + ["run.resume=must"])
    with start_run(cfg, "dpo"):
        pass
    assert cfg.model.dtype == "bfloat16"  # the run keeps the dtype it started with
    assert "as the run being resumed started" in capsys.readouterr().out


def test_bf16_base_keeps_the_trained_weights_in_fp32(tiny_model_path):
    from align.models import add_policy_adapter, load_base
    from align.ppo.actor_critic import ActorCritic

    base, _ = load_base(ModelConfig(name=tiny_model_path, dtype="bfloat16"))
    frozen = {p.dtype for p in base.parameters()}
    ac = ActorCritic(copy.deepcopy(base), LoraConfig(r=4), with_critic=True, critic="shared")
    trained = {n: p.dtype for n, p in ac.model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained and set(trained.values()) == {torch.float32}, trained
    assert {p.dtype for n, p in ac.model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    model = add_policy_adapter(base, LoraConfig(r=4))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_bf16_reference_is_the_base_and_packed_pairs_match_rows(tiny_model_path):
    """The reference pass runs in the policy's dtype, so KL and DPO margins compare like with like:
    with the adapter off it is the bf16 base, bit for bit. Packed and separate scoring differ only
    by bf16 rounding of the different summation orders: 0.05 nats on log-probs of ~5-10 (~1 %,
    bf16 keeps 8 bits of mantissa), where the defects packing could bring are whole tokens of
    context (>= 0.2 nats)."""
    from align.scoring.pairs import PACKED_KEYS, PackedPairCollator, install_packed_forward
    from align.models import add_policy_adapter, load_base, reference_mode

    base, tok = load_base(ModelConfig(name=tiny_model_path, dtype="bfloat16"))
    frozen = copy.deepcopy(base)
    model = add_policy_adapter(base, LoraConfig(r=4))
    torch.manual_seed(0)
    for n, w in model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), reference_mode(model):
        assert torch.equal(model(input_ids=ids).logits, frozen(input_ids=ids).logits)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, frozen(input_ids=ids).logits)
    install_packed_forward(model.get_base_model())
    examples = [{"prompt_ids": [5, 6, 7, 8, 9, 10], "chosen_ids": [11, 12, 13], "rejected_ids": [14, 15]},
                {"prompt_ids": [20, 21], "chosen_ids": [22], "rejected_ids": [23, 24, 25, 26]}]
    batch = PackedPairCollator(pad_token_id=tok.pad_token_id)(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                       fused_lm_head=True, **{k: batch[k] for k in PACKED_KEYS}).log_probs.sum(1)
        rows = []
        for key in ("chosen_ids", "rejected_ids"):
            for e in examples:
                x = torch.tensor([e["prompt_ids"] + e[key]])
                lp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
                rows.append(float(lp.gather(-1, x[0, 1:, None]).squeeze(-1)[len(e["prompt_ids"]) - 1:].sum()))
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed, torch.tensor(rows), atol=0.05, rtol=0.01)


def test_a_merged_export_of_a_bf16_run_is_bf16_by_default(tmp_path, tiny_adapter):
    from align.export import export

    run = tmp_path / "runs" / "r"
    (run / "adapter").mkdir(parents=True)
    for f in tiny_adapter.iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    base = json.loads((tiny_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    (run / "config.yaml").write_text(f"model:\n  name: {base}\n  dtype: auto\nrun:\n  seed: 0\ntrain:\n  beta: 0.1\n")
    (run / "run.json").write_text('{"job": "dpo", "dtype": "bfloat16"}\n')
    report = export(run, tmp_path / "m", merge=True, vllm_check=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" and "bfloat16" in report["merged_tolerance"]
    export(run, tmp_path / "m32", merge=True, dtype="float32", vllm_check=False)  # asked: asked
    cfg = json.loads((tmp_path / "m32" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"


def _policy(path, dtype, seed=1, std=0.02):
    from align.models import add_policy_adapter, load_base

    base, tok = load_base(ModelConfig(name=path, dtype=dtype))
    model = add_policy_adapter(base, LoraConfig(r=4))
    g = torch.Generator().manual_seed(seed)
    for n, w in model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, std, generator=g)
    return model.eval(), tok


PROMPTS = [f"Tell me about {w}." for w in ("bread", "the sea", "music", "rain", "Paris", "tea", "films", "snow")]


def test_parity_in_bf16_accepts_rounding_near_ties_and_catches_an_adapter_one_step_old(tiny_model_path):
    """The engine here is transformers on the *same* adapter over an fp32 base (another
    implementation that rounds differently), the trainer the bf16 base + fp32 LoRA. Exact token
    comparison flags their rounding near-ties; TIE_MARGIN['bfloat16'] accepts them -- and still
    flags an engine that serves the adapter as it was one optimizer step ago, at the learning
    rate the tiny-model PPO tests train with (5e-2). A step whose effect at the divergence stays
    under the margin cannot be told from rounding by greedy decoding (at 1e-2 this one does not)."""
    from align.rollout.hf import HFEngine
    from align.rollout.parity import TIE_MARGIN, check_parity

    margin = TIE_MARGIN["bfloat16"]
    trainer, tok = _policy(tiny_model_path, "bfloat16")
    same, _ = _policy(tiny_model_path, "float32")
    exact = check_parity(HFEngine(same, tok), trainer, tok, PROMPTS, tie_margin=0.0)
    ruled = check_parity(HFEngine(same, tok), trainer, tok, PROMPTS, tie_margin=margin)
    assert exact["mismatches"] and ruled["mismatches"] == [] and ruled["near_ties"] >= len(exact["mismatches"])
    assert max(m["logprob_gap"] for m in exact["mismatches"]) <= margin

    stale = copy.deepcopy(same)  # the engine's copy, one optimizer step behind the trainer
    trainer.train()
    opt = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=5e-2)
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    logp = trainer(input_ids=x).logits[0, :-1].float().log_softmax(-1)
    (-logp.gather(-1, x[0, 1:, None]).mean()).backward()
    opt.step()
    trainer.eval()
    caught = check_parity(HFEngine(stale, tok), trainer, tok, PROMPTS, tie_margin=margin)
    assert caught["mismatches"], caught
