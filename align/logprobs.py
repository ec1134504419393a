"""Per-token log-probs (and entropy) from logits: the one computation DPO scoring, PPO
experience and PPO updates share. In fp32 whatever the model's dtype: log-softmax over a
49k vocabulary in bf16 loses the small differences the losses are made of."""
from __future__ import annotations

import torch


def entropy(logp_all: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of log-probabilities over the vocabulary."""
    return -(logp_all.exp() * logp_all).sum(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False):
    """(log p(target), entropy or None) for each position; ``logits`` (..., V), ``targets`` (...)."""
    logp_all = logits.float().log_softmax(-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, (entropy(logp_all) if with_entropy else None)
