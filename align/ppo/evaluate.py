"""Held-out evaluation of the policy during PPO: reward and KL per answer on fixed prompts."""
from __future__ import annotations

import torch

from ..rollout.base import SamplingConfig
from .experience import collate, score_completions


@torch.no_grad()
def evaluate_prompts(ac, engine, tok, prompts, reward_fn, cfg, seed: int, cancelled=None) -> dict:
    """Held-out prompts (``messages`` + ``ids``), one sample each with a fixed seed: reward (no
    truncation penalty: the raw reward is what is compared) and KL per answer."""
    sampling = SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, seed=seed)
    comps = engine.generate([p["ids"] for p in prompts], sampling)
    scores = score_completions(reward_fn, [p["messages"][-1]["content"] for p in prompts], comps,
                               cfg.reward, cancelled=cancelled, penalize=False)
    x, attn, pred_pos, targets, mask = collate(comps, tok.pad_token_id, ac.device)
    ac.eval()
    with ac.role("policy"):
        logp, _ = ac.token_logprobs(x, attn, pred_pos, targets)
    with ac.role("reference"):
        ref, _ = ac.token_logprobs(x, attn, pred_pos, targets)
    ac.train()
    kl = ((logp - ref) * mask).sum(1)
    return {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
            "kl_per_answer": float(kl.mean()), "length": float(mask.sum(1).mean()),
            "samples": [{"prompt": p["messages"][-1]["content"], "completion": c.text, "reward": float(s)}
                        for p, c, s in zip(prompts[:4], comps[:4], scores[:4])]}
