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


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """KL(policy || reference) as a loss term (``ppo.kl_penalty=loss``), token mean -- the same
    reduction as :func:`policy_loss`, so its coefficient weighs it against the advantages
    directly. Differentiated through ``logp``; k2 or k3 (k1's gradient is zero in expectation)."""
    if kind == "k1":
        raise ValueError("kl_loss needs k2 or k3: the gradient of k1 is zero in expectation")
    return masked_mean(kl_per_token(logp, ref_logp, kind), mask)


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
                mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: -min(ratio * A, clip(ratio, 1-e, 1+e) * A), token mean.

    Also returns the clip fraction and approx-KL(old||new) = mean((ratio - 1) - log ratio).
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
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
                     eps: float = 1e-6) -> torch.Tensor:
    """Critic-free sequence advantages from groups of samples of the same prompt.

    ``scores`` is (n_prompts * group_size,) with each prompt's samples contiguous.
    grpo: (s - mean_group) / (std_group + eps); rloo: s - mean of the *other* samples.
    """
    s = scores.view(-1, group_size)
    if kind == "grpo":
        adv = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps)
    elif kind == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs group_size >= 2")
        adv = s - (s.sum(1, keepdim=True) - s) / (group_size - 1)
    else:
        raise ValueError(f"unknown group advantage '{kind}' (grpo or rloo)")
    return adv.reshape(-1)
