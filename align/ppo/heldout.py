"""Held-out evaluation of the policy during PPO: reward, judge and KL per answer on fixed prompts,
and at the end the base's answers against the policy's, side by side."""
from __future__ import annotations

import json
import math

import torch

from ..scoring.batch import in_chunks
from ..scoring.stats import win_rate
from ..rollout.base import SamplingConfig
from ..scorers import score_completions
from .experience import collate


@torch.no_grad()
def evaluate_prompts(ac, engine, tok, prompts, reward_fn, cfg, seed: int, cancelled=None, judge_fn=None) -> dict:
    """Held-out prompts (``messages`` + ``ids``), one sample each with a fixed seed: reward (no
    truncation penalty: the raw reward is what is compared), judge score and KL per answer.
    ``answers`` holds every prompt's answer and scores, ``completions`` the answers themselves."""
    sampling = SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, seed=seed)
    comps = engine.generate([p["ids"] for p in prompts], sampling)
    scores = score_completions(reward_fn, prompts, comps, cfg.reward, cancelled=cancelled, penalize=False)
    judged = score_completions(judge_fn, prompts, comps, cfg.judge, cancelled=cancelled, penalize=False) \
        if judge_fn is not None else None
    tb = collate(comps, tok.pad_token_id, ac.device)
    mask = tb.mask
    ac.eval()
    with ac.role("policy"):
        logp, _ = in_chunks(ac.token_logprobs, tb, cfg.ppo.micro_batch_size)
    with ac.role("reference"):
        ref, _ = in_chunks(ac.token_logprobs, tb, cfg.ppo.micro_batch_size)
    ac.train()
    kl = ((logp - ref) * mask).sum(1)
    scored = scores[torch.isfinite(scores)]  # a reward's None ("no score") is left out
    out = {"reward_mean": float(scored.mean()), "reward_std": float(scored.std()),
           "unscored": int(len(scores) - len(scored)),
           "kl_per_answer": float(kl.mean()), "length": float(mask.sum(1).mean())}
    if judged is not None:
        out.update(judge_mean=float(judged.mean()), judge_std=float(judged.std()))
    for name, mean in getattr(reward_fn, "last_means", {}).items():  # a reward of several terms
        out[f"reward_mean_{name}"] = mean
    out["completions"] = comps
    out["answers"] = [{"prompt": p["messages"][-1]["content"], "source": p.get("source", ""), "completion": c.text,
                       "tokens": len(c.token_ids), "reward": float(s), "kl": float(k),
                       **({"judge": float(judged[i])} if judged is not None else {})}
                      for i, (p, c, s, k) in enumerate(zip(prompts, comps, scores, kl))]
    return out


def side_by_side(samples_path, out_path) -> dict | None:
    """The base's answers (the held-out eval at iteration 0, where the policy *is* the base: its
    LoRA starts at zero) against the last evaluation's, per prompt, written to ``out_path``;
    returns win rates (ties 1/2) with 95% CIs by the training reward and by the judge, and
    the answer lengths (a longer answer is not a better one)."""
    evals: dict[int, list] = {}
    for line in open(samples_path):
        rec = json.loads(line)
        if rec.get("split") == "eval" and "tokens" in rec:
            evals.setdefault(rec["iteration"], []).append(rec)
    if 0 not in evals or len(evals) < 2:
        return None
    base, policy = evals[0], evals[max(evals)]
    pairs = list(zip(base, policy))
    with open(out_path, "w") as f:
        for b, p in pairs:
            f.write(json.dumps({"prompt": b["prompt"], "source": b.get("source", ""),
                                "base": b["completion"], "policy": p["completion"],
                                **{f"{k}_{who}": r[k] for k in ("reward", "judge", "tokens") if k in b
                                   for who, r in (("base", b), ("policy", p))}}) + "\n")
    out = {"prompts": len(pairs), "iteration": max(evals),
           "length_base": sum(b["tokens"] for b, _ in pairs) / len(pairs),
           "length_policy": sum(p["tokens"] for _, p in pairs) / len(pairs)}
    for key in ("reward", "judge"):
        if key in base[0]:
            scored = [(b, p) for b, p in pairs if math.isfinite(b[key]) and math.isfinite(p[key])]
            if not scored:
                continue
            m, (lo, hi) = win_rate([p[key] for _, p in scored], [b[key] for b, _ in scored])
            out[f"{key}_win_rate"], out[f"{key}_win_rate_ci95"] = round(m, 4), [round(lo, 4), round(hi, 4)]
            out[f"{key}_mean_base"] = sum(b[key] for b, _ in scored) / len(scored)
            out[f"{key}_mean_policy"] = sum(p[key] for _, p in scored) / len(scored)
    return out
