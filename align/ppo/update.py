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


class LossPasses(torch.nn.Module):
    """The forward passes of a PPO step as one module's ``forward`` (``passes("policy_pass",
    batch)``), so that torch's DistributedDataParallel, which hooks a module's forward, wraps
    them: the roles' methods are not ``forward`` themselves."""

    def __init__(self, ac):
        super().__init__()
        self.ac = ac

    def forward(self, method: str, batch, **kwargs):
        return getattr(self.ac, method)(batch, **kwargs)


def _synced(passes, sync: bool):
    """Gradients are averaged over ranks only in the backward of a pass run with ``sync``; the
    others accumulate locally (DDP's ``no_sync``, FSDP2's gradient-sync switch)."""
    return distributed.gradient_sync(passes, sync)


def ppo_update(ac, exp: Experience, optimizer, cfg, guard=None, it: int = 0, meter=None,
               kl_coef: float = 0.0, passes=None) -> dict:
    """Several epochs of minibatch updates on one batch; stops early on approx-KL. A minibatch
    with a NaN/inf loss or gradient makes no update (``guard`` counts it). With
    ``ppo.kl_penalty=loss``, ``kl_coef`` weighs the KL-to-reference loss term.

    ``passes``: :class:`LossPasses` of ``ac``, under DDP or FSDP2 with several processes
    (:func:`align.distributed.data_parallel`). With N ranks each holds 1/N of the batch and of
    every minibatch; each local token-mean loss is scaled by (local tokens / global tokens) x N,
    and DDP/FSDP2 average the gradients once per minibatch (the micro-chunks and a separate critic's
    pass accumulate under ``no_sync``), so the gradient is that of the global minibatch's token
    mean -- what one process would compute."""
    passes = passes if passes is not None else LossPasses(ac)
    p = cfg.ppo
    world = distributed.world_size()
    mb_size = p.minibatch_size // world
    stats: dict[str, list[float]] = {k: [] for k in
                                     ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "kl_loss")}
    params = ac.policy_parameters() + ac.value_parameters()
    ac.train()
    meter = meter or NullMeter()
    flop_passes = 2 * (2 if ac.with_critic and not ac.shared_critic else 1)  # forward + backward, critic's too
    epochs_done = 0
    for epoch in range(p.ppo_epochs):
        epoch_kl = []
        for n_mb, idx in enumerate(exp.minibatches(mb_size)):
            t_mb = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            mb_tokens = exp.mask[idx].sum()
            units = losses.aggregation_units(exp.train_mask[idx], p.loss_aggregation)
            total = distributed.all_sum(units).clamp(min=1)
            got, read = {}, 0
            chunks = _micro_chunks(idx, p.micro_batch_size)
            for i, micro in enumerate(chunks):
                mb = exp.select(micro)
                # the global minibatch's aggregate: each chunk's weighted by its tokens (or answers)
                scale = float(losses.aggregation_units(mb.train_mask, p.loss_aggregation) * world / total)
                # a NaN loss gives NaN gradients: averaged to every rank, caught below on every rank
                parts = _backward(passes, ac, mb, p, scale, kl_coef, sync=i == len(chunks) - 1)
                read += mb.batch.tokens
                for k, v in parts.items():
                    got[k] = got.get(k, 0.0) + v * scale
            torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)  # DTensor-aware under FSDP2
            # under FSDP2 a rank holds a shard of each gradient: a NaN stays in one rank's shard,
            # so every rank asks all of them, and all skip or all step
            if distributed.any_rank(not grads_finite(params)):
                (guard or NonFiniteGuard(0)).skip(
                    params, f"iteration {it}, epoch {epoch}, minibatch {n_mb}")
                continue
            optimizer.step()
            meter.add("update", time.perf_counter() - t_mb, forward_gflop(meter.counts, read * flop_passes, int(mb_tokens) * 2))
            for k, v in got.items():
                stats[k].append(v)
            epoch_kl.append(got["approx_kl"])
        epochs_done += 1
        mean_kl = distributed.all_mean(sum(epoch_kl) / len(epoch_kl)) if epoch_kl else 0.0
        if p.target_approx_kl and mean_kl > p.target_approx_kl:  # the same decision on every rank
            break
    out = {k: distributed.all_mean(sum(v) / len(v)) for k, v in stats.items() if v}
    out["ppo_epochs_done"] = epochs_done
    return out


def _micro_chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The minibatch's sample indices in chunks of ``size`` (0: one chunk); chunks keep each
    prompt's answers together since ``size`` is a multiple of the group size (config check)."""
    return [idx] if not size or size >= len(idx) else list(idx.split(size))


def _backward(passes, ac, mb, p, scale: float, kl_coef: float = 0.0, sync: bool = True) -> dict:
    """Back-propagate ``scale`` x the minibatch loss (token means); its parts as floats. A
    separate critic's pass is run and back-propagated after the policy's graph is freed (the
    two share no trained weight, so the gradients are the same): one pass's activations alive
    at a time, not two. ``sync``: this chunk's last backward averages over ranks."""
    separate = ac.with_critic and not ac.shared_critic
    mask, agg = mb.train_mask, p.loss_aggregation
    with _synced(passes, sync and not separate):
        logp, entropy, v = passes("policy_pass", mb.batch, with_entropy=True, with_values=not separate)
        pl, info = losses.policy_loss(logp, mb.old_logp, mb.advantages, mask, p.clip_range,
                                      p.clip_range_high or None, agg)
        ent = losses.aggregate(entropy, mask, agg)
        loss = pl - p.entropy_coef * ent
        parts = {"policy_loss": float(pl.detach()), "entropy": float(ent.detach()),
                 "clipfrac": float(info["clipfrac"]), "approx_kl": float(info["approx_kl"])}
        if p.kl_penalty == "loss":
            kl = losses.kl_loss(logp, mb.ref_logp, mask, p.kl_estimator, agg)
            loss = loss + kl_coef * kl
            parts["kl_loss"] = float(kl.detach())
        if v is not None:  # a shared critic: its values came with the policy's pass
            vl, _ = losses.value_loss(v, mb.values, mb.returns, mask, p.value_clip_range)
            loss = loss + p.vf_coef * vl
            parts["value_loss"] = float(vl.detach())
        (loss * scale).backward()
    if separate:  # the policy's graph is freed before the critic's pass
        with _synced(passes, sync):
            v = passes("values", mb.batch)
            vl, _ = losses.value_loss(v, mb.values, mb.returns, mask, p.value_clip_range)
            parts["value_loss"] = float(vl.detach())
            (p.vf_coef * vl * scale).backward()
    return parts


def make_optimizer(ac, cfg):
    groups = [{"params": ac.policy_parameters(), "lr": cfg.ppo.learning_rate}]
    if ac.with_critic:
        groups.append({"params": ac.value_parameters(), "lr": cfg.ppo.value_learning_rate})
    return torch.optim.AdamW(groups, weight_decay=0.0)
