"""Held-out DPO evaluation: the implicit-reward and reference-free accuracies of
:mod:`align.scoring.pairs` for the trained policy, against reference scores computed once (and
cached in the run folder for a resumed run), shared across processes."""
from __future__ import annotations

import dataclasses
import time

import torch

from .. import distributed
from ..models import reference_mode
from ..scoring.pairs import (PairScores, implicit_reward_metrics, normalized_margin_accuracy, per_pair_marks,
                             reference_free_accuracy, score_pairs)


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


def cached_reference(run, split: str, model, dataset, collator, batch_size: int,
                     store: str = "off") -> tuple[PairScores, dict]:
    """Reference log-probs of a split, computed once: kept in the run folder (a resumed run reads
    them) and, unless ``store`` (``train.reference_cache``) is ``off``, in the store shared by
    runs (:mod:`.reference_store`: a run on the same base, tokens and batching reads them).
    Returns the scores and what the store said (``{}`` when it was not asked)."""
    from . import reference_store

    path = run.path / f"reference_logps_{split}.pt"
    if run.resume_from is not None and path.exists():
        print(f"reference scores for {split}: reusing {path}")
        return PairScores(**torch.load(path, map_location="cpu")), {}  # saved from any device
    found, said, seconds = reference_store.scores_through(
        store, model, dataset, collator, batch_size,
        lambda: dataclasses.asdict(score_reference(model, dataset, collator, batch_size)))
    scores = PairScores(**found)
    if said.get("hit"):
        print(f"reference scores for {split} ({len(scores.chosen_logp)} pairs): read from {said['path']} "
              f"(computing them took {said['computed_seconds']:.0f}s)")
    else:
        print(f"reference scores for {split} ({len(scores.chosen_logp)} pairs) in {seconds:.0f}s")
    if said:
        run.record(reference_cache={split: said})
    distributed.barrier()  # rank 0 may be about to write the file the others would read
    if distributed.rank() == 0:
        from ..atomic import disk_refusals

        tmp = path.with_suffix(".tmp")
        with disk_refusals(f"caching the reference scores ({path.name})", run.path, remove=tmp,
                           then="nothing was trained yet; free space and start again"):
            torch.save(dataclasses.asdict(scores), tmp)
            tmp.replace(path)
    return scores, said


def evaluate(peft_model, dataset, collator, beta: float, ref: PairScores,
             batch_size: int = 8) -> dict:
    """The held-out metrics, and under ``per_pair`` each pair's marks
    (:func:`align.scoring.pairs.per_pair_marks`: for paired intervals between methods)."""
    policy = score_pairs(peft_model, dataset, collator, batch_size, desc="policy scores")
    return {
        "pairs": len(dataset),
        **implicit_reward_metrics(policy, ref, beta),
        "normalized_margin_accuracy": normalized_margin_accuracy(policy, ref),
        "reference_free_accuracy_base": reference_free_accuracy(ref),
        "reference_free_accuracy_policy": reference_free_accuracy(policy),
        "per_pair": per_pair_marks(policy, ref),
    }
