"""The parity guard: after a sync, the engine must decode exactly like the trainer's policy.

Engine-neutral: it greedy-decodes a few prompts through ``engine.generate`` and through the
trainer's model (fp32) and compares token ids. Any mismatch means the engine serves another
policy than the one being trained (a stale or half-applied adapter), and training on its
samples would be silently off-policy, so the run stops.
"""
from __future__ import annotations

from ..chat import greedy_ids, prompt_ids
from ..scoring.logprobs import next_token_logprobs
from .base import RolloutEngine, SamplingConfig


class StaleAdapterError(RuntimeError):
    """The engine did not decode like the trainer's current policy."""


# How far apart two correct implementations of the same policy can put a token's log-prob in
# each dtype (the engine's kernels vs the trainer's, each rounding its own way): a greedy
# divergence where the engine's token is within this of the trainer's best choice is a near-tie,
# not a stale policy. fp32: exact (0). bf16/fp16: see TIE_MARGIN_MEASURED.
# Measured (scripts/bench_dtype.py, results/bench_dtype.json): SmolLM2-135M-Instruct in bf16 vs
# the same weights in fp32, 8 HH prompts x 16 greedy tokens (124 positions): the gap between the
# two best tokens moved by at most 0.37 nats (p99 0.25, median 0.06). Engine and trainer each
# round their own way, so the margin is twice that. fp16 rounds finer; it takes bf16's (unmeasured).
TIE_MARGIN = {"float32": 0.0, "bfloat16": 0.75, "float16": 0.75}


def check_parity(engine: RolloutEngine, peft_model, tok, prompts: list, max_new_tokens: int = 16,
                 tie_margin: float = 0.0) -> dict:
    """Greedy-decode ``prompts`` (strings or message lists) in the engine and in the trainer. A
    divergence counts as a mismatch unless the engine's token at the first differing position
    is within ``tie_margin`` nats of the trainer's best token there (a rounding near-tie)."""
    ids = [prompt_ids(tok, p) for p in prompts]
    eng = engine.generate(ids, SamplingConfig(max_new_tokens=max_new_tokens, greedy=True))
    mismatches, near_ties = [], 0
    for p, pid, e in zip(prompts, ids, eng):
        out = greedy_ids(peft_model, tok, pid, max_new_tokens)
        if out == e.token_ids:
            continue
        t = next(i for i in range(max(len(out), len(e.token_ids)))
                 if i >= len(out) or i >= len(e.token_ids) or out[i] != e.token_ids[i])
        chosen = e.token_ids[t] if t < len(e.token_ids) else tok.eos_token_id
        gap = choice_gap(peft_model, pid + e.token_ids[:t], chosen)
        if gap <= tie_margin:
            near_ties += 1
            continue
        mismatches.append({"prompt": p, "trainer": tok.decode(out), "engine": tok.decode(e.token_ids),
                           "position": t, "logprob_gap": round(gap, 4)})
    return {"prompts": len(prompts), "mismatches": mismatches, "near_ties": near_ties}


def choice_gap(peft_model, context: list[int], token: int) -> float:
    """The trainer's log-prob of its best next token minus that of ``token``, after ``context``
    (fp32 log-softmax of the model's logits): 0 when ``token`` is its greedy choice."""
    import torch

    was_training = peft_model.training
    peft_model.eval()
    with torch.no_grad():
        x = torch.tensor([context], device=peft_model.device)
        logp = next_token_logprobs(peft_model(input_ids=x).logits[0, -1])
    peft_model.train(was_training)
    return float(logp.max() - logp[token])


def guard_parity(engine: RolloutEngine, peft_model, tok, prompts: list, n: int, every: int, step: int,
                 tie_margin: float = 0.0) -> dict:
    """Check ``n`` prompts every ``every`` steps and raise :class:`StaleAdapterError` on any
    mismatch beyond ``tie_margin`` (:data:`TIE_MARGIN` of the run's dtype); nothing to check for
    an engine that samples from the trainer's own weights."""
    if engine.shares_trainer_weights or not n or not every or step % every:
        return {}
    res = check_parity(engine, peft_model, tok, prompts[:n], tie_margin=tie_margin)
    if res["mismatches"]:
        raise StaleAdapterError(
            f"iteration {step}: the {engine.name} engine does not decode like the trainer's policy "
            f"(adapter version {engine.version}); first mismatch: {res['mismatches'][0]}")
    return {"parity_checked": res["prompts"], "parity_near_ties": res["near_ties"]}
