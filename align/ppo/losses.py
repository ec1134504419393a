"""PPO math: pure tensors in, tensors out -- no model, no I/O -- so hand-computed cases pin it.

Shapes: ``(batch, T)`` over completion tokens, with a 0/1 ``mask`` for real tokens. Sequence
reductions are *token means over the masked tokens of the whole batch* (each token weighs the
same), the convention of OpenRLHF/TRL's PPO; the docstrings say where a function differs.
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Per-token values -> one loss (``ppo.loss_aggregation``):

    - token-mean: sum over masked tokens / their count -- a long answer weighs more;
    - seq-mean-token-sum: each answer's token sum, averaged over answers (Dr. GRPO's unbiased form);
    - seq-mean-token-mean: each answer's token mean, averaged over answers (every answer weighs
      the same, GRPO's original).

    Answers with no masked token (e.g. masked as truncated) are not counted in the seq means."""
    if mode == "token-mean":
        return masked_mean(x, mask)
    m = mask.to(x.dtype)
    per_seq = (x * m).sum(1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / m.sum(1).clamp(min=1)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss aggregation '{mode}' ({', '.join(AGGREGATIONS)})")
    return per_seq.sum() / aggregation_units(mask, mode).clamp(min=1)


def aggregation_units(mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """What :func:`aggregate` averages over: masked tokens (token-mean) or answers with at least
    one masked token (seq means). Micro-batches and data-parallel shards are weighted by it, so
    their losses add up to the whole minibatch's."""
    return mask.sum() if mode == "token-mean" else (mask.sum(1) > 0).sum().to(mask.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8, all_sum=None) -> torch.Tensor:
    """Normalise to unit variance over masked tokens (and zero mean unless ``shift_mean``).
    ``all_sum`` sums a tensor over data-parallel ranks, so the statistics are the global batch's."""
    m = mask.to(x.dtype)
    total = torch.stack([(x * m).sum(), m.sum()])
    total = all_sum(total) if all_sum else total
    mean = total[0] / total[1].clamp(min=1)
    sq = ((x - mean) ** 2 * m).sum()
    sq = all_sum(sq) if all_sum else sq
    var = sq / total[1].clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def masked_rescale(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, all_sum=None) -> torch.Tensor:
    """Divide by the root mean square over masked tokens -- no re-centering, so every value
    keeps its sign. For sequence advantages broadcast to tokens: with answers of unequal
    length the token-weighted mean is not zero, and subtracting it (``masked_whiten``) can turn
    a better-than-its-group answer's advantage negative."""
    m = mask.to(x.dtype)
    total = torch.stack([(x * x * m).sum(), m.sum()])
    total = all_sum(total) if all_sum else total
    return x * torch.rsqrt(total[0] / total[1].clamp(min=1) + eps) * mask


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    k1 = log pi - log ref (unbiased, can be negative per token; the sum over an answer is the
    usual "KL per answer"); k2 = k1^2 / 2 (non-negative; as a loss its gradient k1 * grad log pi
    is KL's own gradient on the policy's samples); k3 = (r - 1) - log r with r = ref/pi
    (unbiased, non-negative, low variance).
    Positive means the policy put more mass on its own sample than the reference did.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{kind}' (k1, k2 or k3)")


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: str = "k3",
            agg: str = "token-mean") -> torch.Tensor:
    """KL(policy || reference) as a loss term (``ppo.kl_penalty=loss``), reduced by ``agg`` -- the
    same reduction as :func:`policy_loss`, so its coefficient weighs it against the advantages
    directly. Differentiated through ``logp``; k2 or k3 (k1's gradient is zero in expectation)."""
    if kind == "k1":
        raise ValueError("kl_loss needs k2 or k3: the gradient of k1 is zero in expectation")
    return aggregate(kl_per_token(logp, ref_logp, kind), mask, agg)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Per-token reward: -beta * KL on every token, plus the sequence score on the last token."""
    rewards = -beta * kl * mask
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(score), device=score.device), last] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the completion tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t (V past the last real token is 0);
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V. Padding gets 0.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2, clip_high: float | None = None,
                agg: str = "token-mean") -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: -min(ratio * A, clip(ratio, 1 - e, 1 + e_high) * A), reduced by ``agg``
    (:func:`aggregate`); ``clip_high`` (DAPO's clip-higher) defaults to ``clip``.

    Also returns the clip fraction and approx-KL(old||new) = mean((ratio - 1) - log ratio), token means.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high))
    loss = aggregate(torch.maximum(unclipped, clipped), mask, agg)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- e) - R)^2), token mean (PPO2's clipped value loss)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        vclipfrac = masked_mean(((v_clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)
    return loss, {"value_clipfrac": vclipfrac}


def group_advantages(scores: torch.Tensor, group_size: int, kind: str = "grpo",
                     eps: float = 1e-6, scale: str = "auto", all_sum=None) -> torch.Tensor:
    """Critic-free sequence advantages from groups of samples of the same prompt.

    ``scores`` is (n_prompts * group_size,) with each prompt's samples contiguous; a NaN score is
    a sample the reward did not score (TRL's ``None``): it gets advantage 0 and is left out of
    its group's statistics. Centring: grpo s - mean of the group; rloo s - mean of the group's
    *other* samples (fewer than two scored samples: 0). Then ``scale``: group (/ (group std +
    eps)), batch (/ (std of the batch's scores + eps), ``all_sum`` summing over data-parallel
    ranks), none (Dr. GRPO); auto = group for grpo, none for rloo. Stds are unbiased (n - 1).
    """
    s = scores.view(-1, group_size)
    valid = torch.isfinite(s)
    v = valid.to(s.dtype)
    x = torch.where(valid, s, torch.zeros_like(s))
    n = v.sum(1, keepdim=True)
    if kind == "grpo":
        adv = x - x.sum(1, keepdim=True) / n.clamp(min=1)
    elif kind == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs group_size >= 2")
        adv = torch.where(n > 1, x - (x.sum(1, keepdim=True) - x) / (n - 1).clamp(min=1), torch.zeros_like(x))
    else:
        raise ValueError(f"unknown group advantage '{kind}' (grpo or rloo)")
    scale = {"auto": "group" if kind == "grpo" else "none"}.get(scale, scale)
    if scale == "group":
        mean = x.sum(1, keepdim=True) / n.clamp(min=1)
        std = (((x - mean) ** 2 * v).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        adv = adv / (std + eps)
    elif scale == "batch":
        total = torch.stack([x.sum(), (x * x).sum(), v.sum()])
        total = all_sum(total) if all_sum else total
        mean = total[0] / total[2].clamp(min=1)
        std = ((total[1] - total[2] * mean ** 2).clamp(min=0) / (total[2] - 1).clamp(min=1)).sqrt()
        adv = adv / (std + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling '{scale}' (group, batch, none or auto)")
    return (adv * v).reshape(-1)


def equal_reward_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n_prompts,) True where a group's scored samples all have the same score (or none was
    scored): such a group gives a group baseline nothing to learn from."""
    s = scores.view(-1, group_size)
    valid = torch.isfinite(s)
    hi = torch.where(valid, s, torch.full_like(s, -torch.inf)).max(1).values
    lo = torch.where(valid, s, torch.full_like(s, torch.inf)).min(1).values
    return ~valid.any(1) | (hi == lo)
