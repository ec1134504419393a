"""Experience making, apart from the update: rollouts -> rewards -> log-probs of policy and
reference, values, per-token KL penalty, advantages and returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from reward.api import call_reward

from .. import distributed
from ..rollout.base import Completion, SamplingConfig
from . import losses


@dataclass
class Experience:
    input_ids: torch.Tensor       # (B, L) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, L)
    pred_pos: torch.Tensor        # (B, T) position whose output predicts completion token t
    targets: torch.Tensor         # (B, T) completion token ids (pad where mask is 0)
    mask: torch.Tensor            # (B, T) 1 on real completion tokens
    old_logp: torch.Tensor        # (B, T) policy at sampling time
    ref_logp: torch.Tensor        # (B, T) reference (adapters off)
    values: torch.Tensor | None   # (B, T) critic
    scores: torch.Tensor          # (B,) reward function (+ truncation penalty)
    kl: torch.Tensor              # (B, T) per-token KL estimate, masked
    advantages: torch.Tensor      # (B, T)
    returns: torch.Tensor | None  # (B, T)
    prompts: list[str]
    completions: list[str]
    finished: list[bool]
    # mean |engine log-prob - trainer log-prob| of the sampled tokens (None: engine gave none)
    engine_logprob_gap: float | None = None

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def select(self, idx: torch.Tensor) -> "Experience":
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, torch.Tensor):
                out[k] = v[idx]
            elif isinstance(v, list):
                out[k] = [v[i] for i in idx.tolist()]
            else:
                out[k] = v
        return Experience(**out)


def collate(completions: list[Completion], pad_id: int, device=None):
    """Right-padded prompt+completion rows and the gather indices for completion tokens."""
    B = len(completions)
    L = max(len(c.prompt_ids) + len(c.token_ids) for c in completions)
    T = max(1, max(len(c.token_ids) for c in completions))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pred_pos = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    for i, c in enumerate(completions):
        P, C = len(c.prompt_ids), len(c.token_ids)
        ids[i, :P + C] = torch.tensor(c.prompt_ids + c.token_ids)
        attn[i, :P + C] = 1
        pred_pos[i] = (torch.arange(T) + P - 1).clamp(max=L - 1)
        if C:
            targets[i, :C] = torch.tensor(c.token_ids)
            mask[i, :C] = 1
    return tuple(t.to(device) for t in (ids, attn, pred_pos, targets, mask)) if device else \
        (ids, attn, pred_pos, targets, mask)


@torch.no_grad()
def make_experience(ac, engine, tok, prompts: list[dict], reward_fn, cfg, estimator, kl_coef: float,
                    sampling: SamplingConfig, cancelled=None) -> Experience:
    """``prompts`` carry ``messages`` and their token ``ids`` (:func:`align.chat.encode_prompts`);
    each is sampled ``cfg.ppo.samples_per_prompt`` times. ``estimator``
    (:mod:`align.ppo.advantages`) turns scores, KL and values into advantages."""
    k = cfg.ppo.samples_per_prompt
    completions = engine.generate([p["ids"] for p in prompts for _ in range(k)], sampling)
    samples = [p for p in prompts for _ in range(k)]
    prompt_text = [p["messages"][-1]["content"] for p in samples]
    comp_text = [c.text for c in completions]
    finished = [c.finished for c in completions]
    scores = score_completions(reward_fn, samples, completions, cfg.reward, ac.device, cancelled)

    ids, attn, pred_pos, targets, mask = collate(completions, tok.pad_token_id, ac.device)
    was_training = ac.training
    ac.eval()
    with ac.role("policy"):
        old_logp, _ = ac.token_logprobs(ids, attn, pred_pos, targets)
    with ac.role("reference"):
        ref_logp, _ = ac.token_logprobs(ids, attn, pred_pos, targets)
    values = ac.values(ids, attn, pred_pos) * mask if estimator.needs_critic else None
    ac.train(was_training)
    old_logp, ref_logp = old_logp * mask, ref_logp * mask
    kl = losses.kl_per_token(old_logp, ref_logp, cfg.ppo.kl_estimator) * mask
    advantages, returns = estimator.compute(scores, kl, mask, values, kl_coef, cfg.ppo)
    if cfg.ppo.whiten_advantages:
        advantages = estimator.normalize(advantages, mask, all_sum=distributed.all_sum)
    return Experience(ids, attn, pred_pos, targets, mask, old_logp, ref_logp, values, scores, kl,
                      advantages, returns, prompt_text, comp_text, finished,
                      engine_logprob_gap(completions, old_logp, mask))


def score_completions(reward_fn, prompts: list[dict], completions: list[Completion], reward_cfg,
                      device=None, cancelled=None, penalize: bool = True) -> torch.Tensor:
    """The reward function's scores (bounded by ``reward.timeout_seconds``), plus
    ``reward.truncation_penalty`` for answers cut without EOS when ``penalize``. ``prompts``
    (one per completion) carry ``messages``: the function sees the whole dialogue."""
    truncated = [not c.finished for c in completions]
    scores = torch.tensor(call_reward(
        reward_fn, [p["messages"][-1]["content"] for p in prompts], [c.text for c in completions],
        timeout=reward_cfg.timeout_seconds, cancelled=cancelled, truncated=truncated,
        messages=[p["messages"] for p in prompts], prompt_ids=[c.prompt_ids for c in completions],
        completion_ids=[c.token_ids for c in completions]), device=device)
    if penalize and getattr(reward_cfg, "truncation_penalty", 0.0):
        scores = scores + reward_cfg.truncation_penalty * torch.tensor([float(t) for t in truncated],
                                                                       device=device)
    return scores


def engine_logprob_gap(completions: list[Completion], logp: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean |engine log-prob - trainer log-prob| over sampled tokens (None: no engine log-probs)."""
    if not completions or completions[0].logprobs is None:
        return None
    eng = torch.zeros_like(logp)
    for i, c in enumerate(completions):
        eng[i, :len(c.logprobs)] = torch.tensor(c.logprobs, device=logp.device)
    return float(((eng - logp).abs() * mask).sum() / mask.sum().clamp(min=1))
