"""Held-out DPO evaluation.

(a) implicit-reward accuracy: r = beta * (log pi(y|x) - log ref(y|x)); a pair counts 1 if
    r_chosen > r_rejected, 1/2 on a tie (so an untrained, zero-initialised adapter scores
    exactly 0.5), else 0; plus the mean margin r_chosen - r_rejected.
(b) reference-free: the share of pairs where a model gives the chosen answer a higher *mean
    per-token* log-prob than the rejected one (ties 1/2) -- for the base (adapter off) and for
    the trained adapter, to show the policy itself moved.
The reference scores are computed once and reused for (a) and for the base's (b).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..models import reference_mode
from .packing import PACKED_KEYS, PackedPairCollator, packed_length


@dataclass
class PairScores:
    chosen_logp: torch.Tensor    # summed log-prob of each chosen answer
    rejected_logp: torch.Tensor
    chosen_tokens: torch.Tensor  # number of scored tokens
    rejected_tokens: torch.Tensor


@torch.no_grad()
def score_pairs(model, dataset, collator: PackedPairCollator, batch_size: int = 8,
                desc: str = "scoring") -> PairScores:
    """Summed log-probs of chosen/rejected for every tokenized pair, in dataset order."""
    was_training = model.training
    model.eval()
    out = {k: [] for k in ("c", "r", "cn", "rn")}
    rows = [dataset[i] for i in range(len(dataset))]
    # Score in length order (little padding), then put results back in dataset order.
    order = sorted(range(len(rows)), key=lambda i: packed_length(
        len(rows[i]["prompt_ids"]), len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"]),
        collator.max_length, collator.max_prompt_length))
    rows = [rows[i] for i in order]
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        batch = collator(rows[start:start + batch_size])
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        res = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=labels, fused_lm_head=True, **{k: batch[k] for k in PACKED_KEYS})
        logps = res.log_probs.sum(1)
        n = res.label_mask.sum(1)
        B = len(logps) // 2
        out["c"].append(logps[:B]); out["r"].append(logps[B:])
        out["cn"].append(n[:B]); out["rn"].append(n[B:])
    model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    cat = {k: torch.cat(v).float()[inverse] for k, v in out.items()}
    return PairScores(cat["c"], cat["r"], cat["cn"], cat["rn"])


def _tie_half_accuracy(diff: torch.Tensor) -> float:
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def implicit_reward_metrics(policy: PairScores, ref: PairScores, beta: float) -> dict:
    r_c = beta * (policy.chosen_logp - ref.chosen_logp)
    r_r = beta * (policy.rejected_logp - ref.rejected_logp)
    margin = r_c - r_r
    return {"implicit_accuracy": _tie_half_accuracy(margin),
            "mean_margin": float(margin.mean()),
            "reward_chosen": float(r_c.mean()), "reward_rejected": float(r_r.mean())}


def reference_free_accuracy(s: PairScores) -> float:
    mean_c = s.chosen_logp / s.chosen_tokens.clamp(min=1)
    mean_r = s.rejected_logp / s.rejected_tokens.clamp(min=1)
    return _tie_half_accuracy(mean_c - mean_r)


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
        full = torch.empty(len(dataset), dtype=getattr(mine, k).dtype)
        for r, share in enumerate(shares):
            full[r::world] = torch.tensor(share[k], dtype=full.dtype)
        out[k] = full
    return PairScores(**out)


def cached_reference(run, split: str, compute) -> PairScores:
    """Reference log-probs of a split, computed once per run and kept in the run folder, so a
    resumed run does not pay for them again (they depend only on the base and the data)."""
    path = run.path / f"reference_logps_{split}.pt"
    if run.resume_from is not None and path.exists():
        print(f"reference scores for {split}: reusing {path}")
        return PairScores(**torch.load(path))
    t = time.time()
    scores = compute()
    print(f"reference scores for {split} ({len(scores.chosen_logp)} pairs) in {time.time() - t:.0f}s")
    distributed.barrier()  # rank 0 may be about to write the file the others would read
    if distributed.rank() == 0:
        tmp = path.with_suffix(".tmp")
        torch.save(dataclasses.asdict(scores), tmp)
        tmp.replace(path)
    return scores


def evaluate(peft_model, dataset, collator, beta: float, ref: PairScores,
             batch_size: int = 8) -> dict:
    policy = score_pairs(peft_model, dataset, collator, batch_size, desc="policy scores")
    return {
        "pairs": len(dataset),
        **implicit_reward_metrics(policy, ref, beta),
        "reference_free_accuracy_base": reference_free_accuracy(ref),
        "reference_free_accuracy_policy": reference_free_accuracy(policy),
    }
