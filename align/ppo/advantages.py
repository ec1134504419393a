"""Advantage estimators by name (``ppo.advantage``). Each says whether it needs a critic and
how many samples per prompt it needs; adding one is one function and one registry line.

An estimator maps a batch's sequence scores, per-token KL, mask and (if it has a critic) values
to per-token advantages and value targets (``None`` without a critic). The math itself lives in
:mod:`align.ppo.losses` (pure tensors, hand-checked tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import distributed
from . import losses


@dataclass(frozen=True)
class Estimator:
    name: str
    needs_critic: bool
    min_group: int  # samples per prompt it needs (group baselines compare samples of one prompt)
    compute: Callable  # (scores, kl, mask, values, beta, ppo_cfg) -> (advantages, returns | None)
    # ppo.whiten_advantages: (advantages, mask, all_sum) -> normalised advantages
    normalize: Callable = losses.masked_whiten


def _gae(scores, kl, mask, values, beta, p):
    """Actor-critic: -beta * KL on every token, the score on the last, GAE against the critic.
    An unscored sample (NaN) counts as 0 here; the experience gives it no weight in the loss."""
    rewards = losses.token_rewards(torch.nan_to_num(scores, nan=0.0), kl, mask, beta)
    return losses.gae(rewards, values, mask, p.gamma, p.lam)


def _group(kind: str):
    def compute(scores, kl, mask, values, beta, p):
        """Critic-free: the KL is folded into the sequence score, the baseline is the group's,
        and every token of a sample gets that sample's advantage."""
        seq = scores - beta * kl.sum(1)
        adv = losses.group_advantages(seq, p.samples_per_prompt, kind, scale=p.scale_rewards,
                                      all_sum=distributed.all_sum)
        return adv[:, None] * mask, None

    return compute


ESTIMATORS = {
    "gae": Estimator("gae", needs_critic=True, min_group=1, compute=_gae),
    # A group baseline already centres each sample's advantage within its group; re-centring
    # over tokens could flip signs (answers differ in length), so these only rescale.
    "grpo": Estimator("grpo", needs_critic=False, min_group=2, compute=_group("grpo"), normalize=losses.masked_rescale),
    "rloo": Estimator("rloo", needs_critic=False, min_group=2, compute=_group("rloo"), normalize=losses.masked_rescale),
}


def get_estimator(ppo_cfg) -> Estimator:
    """The configured estimator; an unknown name or too small a group is a config error."""
    from ..config import ConfigError

    est = ESTIMATORS.get(ppo_cfg.advantage)
    if est is None:
        raise ConfigError(f"key 'ppo.advantage' must be one of {', '.join(ESTIMATORS)}, "
                          f"got {ppo_cfg.advantage!r}")
    if ppo_cfg.samples_per_prompt < est.min_group:
        raise ConfigError(f"key 'ppo.samples_per_prompt' must be >= {est.min_group} for "
                          f"{est.name} group baselines, got {ppo_cfg.samples_per_prompt}")
    return est
