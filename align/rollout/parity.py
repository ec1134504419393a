"""The parity guard: after a sync, the engine must decode exactly like the trainer's policy.

Engine-neutral: it greedy-decodes a few prompts through ``engine.generate`` and through the
trainer's model (fp32) and compares token ids. Any mismatch means the engine serves another
policy than the one being trained (a stale or half-applied adapter), and training on its
samples would be silently off-policy, so the run stops.
"""
from __future__ import annotations

from ..chat import greedy_ids, prompt_ids
from .base import RolloutEngine, SamplingConfig


class StaleAdapterError(RuntimeError):
    """The engine did not decode like the trainer's current policy."""


def check_parity(engine: RolloutEngine, peft_model, tok, prompts: list, max_new_tokens: int = 16) -> dict:
    """Greedy-decode ``prompts`` (strings or message lists) in the engine and in the trainer."""
    ids = [prompt_ids(tok, p) for p in prompts]
    eng = engine.generate(ids, SamplingConfig(max_new_tokens=max_new_tokens, greedy=True))
    mismatches = []
    for p, pid, e in zip(prompts, ids, eng):
        out = greedy_ids(peft_model, tok, pid, max_new_tokens)
        if out != e.token_ids:
            mismatches.append({"prompt": p, "trainer": tok.decode(out), "engine": tok.decode(e.token_ids)})
    return {"prompts": len(prompts), "mismatches": mismatches}


def guard_parity(engine: RolloutEngine, peft_model, tok, prompts: list, n: int, every: int, step: int) -> dict:
    """Check ``n`` prompts every ``every`` steps and raise :class:`StaleAdapterError` on any
    mismatch; nothing to check for an engine that samples from the trainer's own weights."""
    if engine.shares_trainer_weights or not n or not every or step % every:
        return {}
    res = check_parity(engine, peft_model, tok, prompts[:n])
    if res["mismatches"]:
        raise StaleAdapterError(
            f"iteration {step}: the {engine.name} engine does not decode like the trainer's policy "
            f"(adapter version {engine.version}); first mismatch: {res['mismatches'][0]}")
    return {"parity_checked": res["prompts"]}
