"""Held-out DPO evaluation: the implicit-reward and reference-free accuracies of
:mod:`align.scoring.pairs` for the trained policy, against reference scores computed once (and
cached in the run folder for a resumed run), shared across processes."""
from __future__ import annotations

import dataclasses
import time

import torch

from .. import distributed
from ..models import reference_mode
from ..scoring.pairs import (PairScores, implicit_reward_metrics, normalized_margin_accuracy, reference_free_accuracy,
                             score_pairs)


def score_reference(peft_model, dataset, collator, batch_size=8) -> PairScores:
    """Scores under the reference (adapters off). With N processes each scores every N-th pair
    and the shares are gathered, so the one-off pass is N times shorter, not repeated N times."""
    world, rank = distributed.world_size(), distributed.rank()
    with reference_mode(peft_model):
        if world == 1:
            return score_pairs(peft_model, dataset, collator, batch_size, desc="reference scores")
        mine = score_pairs(peft_model, dataset.select(range(rank, len(dataset), world)), collator,
                           batch_size, desc="reference scores")
    shares = distributed.gather_objects({k: v.tolist() for k, v in vars(mine).items()})
    out = {}
    for k in vars(mine):
        full = torch.empty(len(dataset), dtype=getattr(mine, k).dtype, device="cpu")
        for r, share in enumerate(shares):
            full[r::world] = torch.tensor(share[k], dtype=full.dtype, device="cpu")
        out[k] = full
    return PairScores(**out)


def cached_reference(run, split: str, compute) -> PairScores:
    """Reference log-probs of a split, computed once per run and kept in the run folder, so a
    resumed run does not pay for them again (they depend only on the base and the data)."""
    path = run.path / f"reference_logps_{split}.pt"
    if run.resume_from is not None and path.exists():
        print(f"reference scores for {split}: reusing {path}")
        return PairScores(**torch.load(path, map_location="cpu"))  # saved from any device
    t = time.time()
    scores = compute()
    print(f"reference scores for {split} ({len(scores.chosen_logp)} pairs) in {time.time() - t:.0f}s")
    distributed.barrier()  # rank 0 may be about to write the file the others would read
    if distributed.rank() == 0:
        from ..atomic import disk_refusals

        tmp = path.with_suffix(".tmp")
        with disk_refusals(f"caching the reference scores ({path.name})", run.path, remove=tmp,
                           then="nothing was trained yet; free space and start again"):
            torch.save(dataclasses.asdict(scores), tmp)
            tmp.replace(path)
    return scores


def evaluate(peft_model, dataset, collator, beta: float, ref: PairScores,
             batch_size: int = 8) -> dict:
    """The held-out metrics, and under ``per_pair`` each pair's mark (1 right, 1/2 tie, 0 wrong)
    by the implicit reward and by the length-normalised margin: what a paired interval between
    two methods scored on the same pairs needs (``scoring.stats.paired_difference``)."""
    policy = score_pairs(peft_model, dataset, collator, batch_size, desc="policy scores")

    def marks(margin):
        return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margin.tolist()]

    per_token = lambda s, side: (getattr(s, f"{side}_logp") - getattr(ref, f"{side}_logp")) \
        / getattr(s, f"{side}_tokens").clamp(min=1)  # noqa: E731
    return {
        "pairs": len(dataset),
        **implicit_reward_metrics(policy, ref, beta),
        "normalized_margin_accuracy": normalized_margin_accuracy(policy, ref),
        "reference_free_accuracy_base": reference_free_accuracy(ref),
        "reference_free_accuracy_policy": reference_free_accuracy(policy),
        "per_pair": {"implicit": marks((policy.chosen_logp - ref.chosen_logp) - (policy.rejected_logp - ref.rejected_logp)),
                     "normalized": marks(per_token(policy, "chosen") - per_token(policy, "rejected")),
                     # reference-free objectives' yardstick: the policy's own per-token margin
                     "reference_free_normalized": marks(policy.chosen_logp / policy.chosen_tokens.clamp(min=1)
                                                        - policy.rejected_logp / policy.rejected_tokens.clamp(min=1))},
    }
