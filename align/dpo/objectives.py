"""Preference objectives that TRL's DPOTrainer does not compute on align's packed scores: pure
tensor functions of per-pair summed log-probs and answer lengths (the shape of
:mod:`align.ppo.losses`), each checked against its closed form in tests/test_objectives.py.

- ``simpo`` (Meng et al. 2024): reference-free; the margin of *average* per-token log-probs,
  scaled by beta, must exceed a target margin gamma = ``gamma_ratio`` x beta. TRL 1.16 has it as
  ``trl.experimental.cpo`` with ``loss_type="simpo"``, ``cpo_alpha=0``; same formula.
- ``orpo`` (Hong et al. 2024): reference-free; the chosen answer's NLL (per token) plus lambda x
  the log-sigmoid of the log odds ratio of the average per-token probabilities (TRL's
  ``experimental.orpo``: ``beta`` is lambda).
- ``kto`` (Ethayarajh et al. 2024): unpaired; each answer is a thumbs-up or a thumbs-down row
  (TRL's ``prompt, completion, label`` format) and moves against a reference point: the policy's
  KL to the reference, estimated on mismatched prompt/answer rows, detached (TRL's KTOTrainer,
  ``loss_type="kto"``).

Each returns ``(loss, metrics)``: the batch's mean loss and per-pair tensors for logging
(``chosen_rewards``, ``rejected_rewards``: what the objective ranks by).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_FREE = ("simpo", "orpo")
UNPAIRED = ("kto",)


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


def kto(logps, ref_logps, desirable, kl, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0):
    """Mean over rows of w_D (1 - sigmoid(beta (r - kl))) for thumbs-up rows and w_U (1 -
    sigmoid(beta (kl - r))) for thumbs-down ones, r = logp - ref_logp of the row's answer;
    ``kl``: the reference point, ``kl_estimate``'s (no gradient)."""
    r = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    rewards = beta * r.detach()
    return losses.mean(), {"chosen_rewards": rewards[desirable], "rejected_rewards": rewards[~desirable],
                           "kl": kl.detach()}


def kl_estimate(mismatched_logps, ref_mismatched_logps) -> torch.Tensor:
    """KTO's reference point: the mean log-ratio of answers under prompts they were not written
    for, detached, at least 0 (the caller averages it over processes)."""
    return (mismatched_logps - ref_mismatched_logps).mean().detach()


def objective_loss(name: str, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, train_cfg):
    """The loss ``train.objective`` names, with its settings from ``train_cfg``."""
    if name == "simpo":
        return simpo(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, train_cfg.beta,
                     train_cfg.simpo_gamma_ratio, train_cfg.label_smoothing)
    if name == "orpo":
        return orpo(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, train_cfg.beta)
    raise ValueError(f"objective_loss: no objective {name!r} (one of {', '.join(REFERENCE_FREE)})")


def kto_rows(pairs: list[dict], seed: int) -> list[dict]:
    """Preference pairs as KTO's unpaired rows -- ``prompt, completion, label`` (True: the chosen
    answer), TRL's format, by TRL's ``unpair_preference_dataset`` -- in a seeded order, each with
    ``mismatched``: the answer of the next row whose prompt differs (KTO's KL estimate scores
    answers under prompts they were not written for)."""
    import datasets
    from trl.data_utils import unpair_preference_dataset

    if len(pairs) < 2:
        raise ValueError(f"train.objective=kto needs at least 2 training pairs, got {len(pairs)}")
    unpaired = unpair_preference_dataset(datasets.Dataset.from_list(
        [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]))
    order = torch.randperm(len(unpaired), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [unpaired[i] for i in order]
    out = []
    for i, row in enumerate(rows):
        j = next(k % len(rows) for k in range(i + 1, i + len(rows)) if rows[k % len(rows)]["prompt"] != row["prompt"])
        out.append({"prompt": row["prompt"], "completion": row["completion"], "label": bool(row["label"]),
                    "mismatched": rows[j]["completion"]})
    return out
