"""The PPO update: several epochs of clipped policy (and value) minibatch steps on one batch
of experience. It reads an :class:`~align.ppo.experience.Experience` and changes only the
trainable adapters; making experience is :mod:`align.ppo.experience`'s job."""
from __future__ import annotations

import time

import torch

from .. import distributed
from ..compute import NullMeter, forward_gflop
from ..guards import NonFiniteGuard, grads_finite
from . import losses
from .experience import Experience


def ppo_update(ac, exp: Experience, optimizer, cfg, guard=None, it: int = 0, meter=None) -> dict:
    """Several epochs of minibatch updates on one batch; stops early on approx-KL. A minibatch
    with a NaN/inf loss or gradient makes no update (``guard`` counts it).

    With N data-parallel ranks each holds 1/N of the batch and of every minibatch; each local
    token-mean loss is scaled by (local tokens / global tokens) x N, so the averaged gradient
    is that of the global minibatch's token mean -- what one process would compute."""
    p = cfg.ppo
    world = distributed.world_size()
    mb_size = p.minibatch_size // world
    stats: dict[str, list[float]] = {k: [] for k in
                                     ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")}
    params = ac.policy_parameters() + ac.value_parameters()
    ac.train()
    meter = meter or NullMeter()
    passes = 2 * (2 if ac.with_critic and not ac.shared_critic else 1)  # forward + backward, critic's too
    epochs_done = 0
    for epoch in range(p.ppo_epochs):
        epoch_kl = []
        for n_mb, idx in enumerate(exp.minibatches(mb_size)):
            mb = exp.select(idx)
            tokens = mb.mask.sum()
            t_mb = time.perf_counter()
            scale = float(tokens * world / distributed.all_sum(tokens).clamp(min=1))
            logp, entropy, v = ac.policy_pass(mb.batch, with_entropy=True)
            pl, info = losses.policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, p.clip_range)
            ent = losses.masked_mean(entropy, mb.mask)
            loss = pl - p.entropy_coef * ent
            if v is not None:
                vl, _ = losses.value_loss(v, mb.values, mb.returns, mb.mask, p.value_clip_range)
                loss = loss + p.vf_coef * vl
                stats["value_loss"].append(float(vl.detach()) * scale)
            optimizer.zero_grad(set_to_none=True)
            (loss * scale).backward()  # a NaN loss gives NaN gradients: caught below, on every rank
            distributed.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)
            if not grads_finite(params):
                (guard or NonFiniteGuard(0)).skip(
                    params, f"iteration {it}, epoch {epoch}, minibatch {n_mb}")
                continue
            optimizer.step()
            meter.add("update", time.perf_counter() - t_mb,
                      forward_gflop(meter.counts, mb.batch.tokens * passes, int(tokens) * 2))
            stats["policy_loss"].append(float(pl.detach()) * scale)
            stats["entropy"].append(float(ent.detach()) * scale)
            stats["clipfrac"].append(float(info["clipfrac"]) * scale)
            stats["approx_kl"].append(float(info["approx_kl"]) * scale)
            epoch_kl.append(float(info["approx_kl"]) * scale)
        epochs_done += 1
        mean_kl = distributed.all_mean(sum(epoch_kl) / len(epoch_kl)) if epoch_kl else 0.0
        if p.target_approx_kl and mean_kl > p.target_approx_kl:  # the same decision on every rank
            break
    out = {k: distributed.all_mean(sum(v) / len(v)) for k, v in stats.items() if v}
    out["ppo_epochs_done"] = epochs_done
    return out


def make_optimizer(ac, cfg):
    groups = [{"params": ac.policy_parameters(), "lr": cfg.ppo.learning_rate}]
    if ac.with_critic:
        groups.append({"params": ac.value_parameters(), "lr": cfg.ppo.value_learning_rate})
    return torch.optim.AdamW(groups, weight_decay=0.0)
