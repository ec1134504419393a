"""Per-token log-probs (and entropy) from logits: the one place align turns vocabulary logits
into log-probabilities -- DPO's packed scoring, PPO's experience and updates, the reference
and reward passes, the HF engine's sampled tokens, export's and the rollout guard's checks.
In fp32 whatever the model's dtype: log-softmax over a 49k vocabulary in bf16 loses the small
differences the losses are made of."""
from __future__ import annotations

import torch


def entropy(logp_all: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of log-probabilities over the vocabulary."""
    return -(logp_all.exp() * logp_all).sum(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                   entropy_grad: bool = True):
    """(log p(target), entropy or None) for each position; ``logits`` (..., V), ``targets`` (...).
    ``entropy_grad=False`` computes the entropy as a metric only (no graph kept for it)."""
    logp_all = next_token_logprobs(logits)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, entropy(logp_all)


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary at each position (fp32)."""
    return logits.float().log_softmax(-1)
