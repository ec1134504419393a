"""Preference objectives that TRL's DPOTrainer does not compute on align's packed scores: pure
tensor functions of per-pair summed log-probs and answer lengths (the shape of
:mod:`align.ppo.losses`), each checked against its closed form in tests/test_objectives.py.

- ``simpo`` (Meng et al. 2024): reference-free; the margin of *average* per-token log-probs,
  scaled by beta, must exceed a target margin gamma = ``gamma_ratio`` x beta. TRL 1.16 has it as
  ``trl.experimental.cpo`` with ``loss_type="simpo"``, ``cpo_alpha=0``; same formula.
- ``orpo`` (Hong et al. 2024): reference-free; the chosen answer's NLL (per token) plus lambda x
  the log-sigmoid of the log odds ratio of the average per-token probabilities (TRL's
  ``experimental.orpo``: ``beta`` is lambda).

Each returns ``(loss, metrics)``: the batch's mean loss and per-pair tensors for logging
(``chosen_rewards``, ``rejected_rewards``: what the objective ranks by).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_FREE = ("simpo", "orpo")


def _average(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logps / tokens.clamp(min=1)


def simpo(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta: float, gamma_ratio: float,
          label_smoothing: float = 0.0):
    """-log sigmoid(beta * (avg_w - avg_l) - gamma), gamma = gamma_ratio * beta; with label
    smoothing e, the conservative mix (1-e) of that and e of the flipped pair."""
    chosen, rejected = _average(chosen_logps, chosen_tokens), _average(rejected_logps, rejected_tokens)
    logits = beta * (chosen - rejected - gamma_ratio)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses.mean(), {"chosen_rewards": beta * chosen.detach(), "rejected_rewards": beta * rejected.detach()}


def orpo(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, lam: float):
    """NLL(chosen, per token, averaged over the batch's chosen tokens) - lam * mean log sigmoid(
    log odds(chosen) - log odds(rejected)), odds of the average per-token probability p:
    log(p / (1 - p)) = avg logp - log(1 - exp(avg logp))."""
    chosen, rejected = _average(chosen_logps, chosen_tokens), _average(rejected_logps, rejected_tokens)
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
    loss = nll - lam * ratio.mean()
    return loss, {"chosen_rewards": lam * chosen.detach(), "rejected_rewards": lam * rejected.detach(),
                  "nll_loss": nll.detach(), "log_odds_ratio": log_odds.detach()}


def objective_loss(name: str, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, train_cfg):
    """The loss ``train.objective`` names, with its settings from ``train_cfg``."""
    if name == "simpo":
        return simpo(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, train_cfg.beta,
                     train_cfg.simpo_gamma_ratio, train_cfg.label_smoothing)
    if name == "orpo":
        return orpo(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, train_cfg.beta)
    raise ValueError(f"objective_loss: no objective {name!r} (one of {', '.join(REFERENCE_FREE)})")
