"""Preference pairs, scored: the layout, forwards and metrics DPO, the reward model and `align eval` share.

A pair ``(prompt, chosen, rejected)`` is laid out as ONE packed row ``prompt + chosen +
rejected``. Position ids restart the rejected answer right after the prompt, and a 4-D
attention mask stops rejected tokens from seeing chosen ones, so each answer sees exactly
``prompt + itself`` -- the same numbers as two separate rows, for ~(P+C+R)/(2P+C+R) of the
backbone cost (:mod:`align.scoring.packing`). The collator also emits the "virtual" layout
(chosen rows, then rejected rows) that TRL's DPOTrainer reads, and the fallback uses.

Two forwards read that layout: :func:`install_packed_forward` (a causal LM: the log-prob of each
answer token, the LM head run on answer tokens only -- TRL's ``fused_lm_head=True`` path, so
DPOTrainer trains through it) and :func:`install_packed_scorer` (a reward model: the score at
each answer's last token). On them: :func:`score_pairs` (summed log-probs: the DPO implicit reward
and the reference-free accuracy) and :func:`pair_scores` (reward-model scores), in data order.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..deps.trl_internals import fused_lm_output
from .batch import Answer, TokenBatch, packed_batch, rows_batch, states_at
from .logprobs import token_logprobs
from .packing import attention_mask_for, packing_blocker
from .stats import tie_half_accuracy

PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_attention_mask", "packed_src")


NO_LIMIT = 1 << 30  # a max_length of "no truncation"


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order that depends only on (seed, epoch): a run resumed in epoch 2 sees
    exactly the order an uninterrupted one would (a shared generator would not)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return super().__iter__()


def grouped_sampler(ds, collator, batch_size: int, seed: int) -> EpochSeededLengthGroupedSampler:
    """Batches of pairs of similar packed length: HH lengths vary a lot and padding is pure waste
    (random batches of 8 real pairs were ~45% padding). Megabatches of 50 batches are sorted by
    length, so the order stays random at the scale of an epoch. ``batch_size`` is the *global*
    batch, so N processes see the batches one would (each takes its slice)."""
    lengths = [packed_length(len(p), len(c), len(r), collator.max_length, collator.max_prompt_length)
               for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    return EpochSeededLengthGroupedSampler(batch_size, lengths=lengths, seed=seed)


class LengthGroupedPairBatches:
    """Mixin for a transformers Trainer over packed pairs (DPO, RM): its training batches come
    from :func:`grouped_sampler` over the global batch (``align_train_sampler`` is the hook
    :class:`align.deps.transformers_internals.TrainerHooks` calls)."""

    def align_train_sampler(self, dataset):
        a = self.args
        return grouped_sampler(dataset, self.data_collator, a.train_batch_size * a.gradient_accumulation_steps * a.world_size,
                               a.data_seed if a.data_seed is not None else a.seed)


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int],
                  max_length: int, max_prompt_length: int):
    """Keep the prompt's *last* tokens (latest turns) and each answer's first tokens."""
    prompt = prompt[-max_prompt_length:] if len(prompt) > max_prompt_length else prompt
    budget = max(1, max_length - len(prompt))
    return prompt, chosen[:budget], rejected[:budget]


def packed_length(P: int, C: int, R: int, max_length: int, max_prompt_length: int) -> int:
    """Tokens in the packed row of a pair after truncation (for length-grouped batching)."""
    P = min(P, max_prompt_length)
    budget = max(1, max_length - P)
    return P + min(C, budget) + min(R, budget)


def truncation_report(dataset, max_length: int, max_prompt_length: int) -> dict:
    """How many tokenized pairs :func:`truncate_pair` will cut: the prompt (its oldest turns go)
    or an answer (its end goes). Printed and kept in the summary so a max_length that throws
    most of the data away is visible, not silent. Also the tokens the packed rows hold (the
    compute is ~linear in them) and the answer tokens the LM head scores."""
    prompt_cut = answer_cut = packed = answers = 0
    for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
        P = min(len(p), max_prompt_length)
        prompt_cut += len(p) > max_prompt_length
        answer_cut += max(len(c), len(r)) > max(1, max_length - P)
        row = packed_length(len(p), len(c), len(r), max_length, max_prompt_length)
        packed, answers = packed + row, answers + row - P
    n = len(dataset)
    return {"pairs": n, "prompt_truncated": prompt_cut, "answer_truncated": answer_cut,
            "packed_tokens": packed, "answer_tokens": answers,
            "message": f"{prompt_cut} of {n} pairs have prompts longer than train.max_prompt_length="
                       f"{max_prompt_length} (oldest turns dropped); {answer_cut} have an answer cut to fit "
                       f"train.max_length={max_length}"}


def pair_layouts(pairs, pad_id: int) -> tuple[TokenBatch, TokenBatch]:
    """(prompt, chosen, rejected) token-id triples as one row per answer (all chosen, then all
    rejected) and as one packed row per pair (chosen, rejected)."""
    chosen = [Answer(p, c) for p, c, _ in pairs]
    rejected = [Answer(p, r) for p, _, r in pairs]
    return (rows_batch(chosen + rejected, pad_id),
            packed_batch([a for pair in zip(chosen, rejected) for a in pair], 2, pad_id))


@dataclass
class PackedPairCollator:
    """Batches TRL-tokenized pairs in both the virtual layout (TRL's: chosen rows, then rejected
    rows) and the packed one, both built by :mod:`align.scoring.batch` -- a pair is a group of two
    answers to one prompt, as PPO's k samples are."""

    pad_token_id: int
    max_length: int = 384
    max_prompt_length: int = 256

    def __call__(self, examples: list[dict]) -> dict:
        trip = [truncate_pair(list(e["prompt_ids"]), list(e["chosen_ids"]), list(e["rejected_ids"]),
                              self.max_length, self.max_prompt_length) for e in examples]
        rows, packed = pair_layouts(trip, self.pad_token_id)
        B, L = len(trip), rows.input_ids.size(1)
        # The virtual rows' answer tokens: each answer token t sits one after the position that predicts it.
        s, t = rows.mask.nonzero(as_tuple=True)
        completion = torch.zeros((2 * B, L), dtype=torch.long)
        completion[s, rows.pred_pos[s, t] + 1] = 1
        # src[row, t]: packed index whose hidden state predicts virtual token t+1 of that row (read
        # on answer tokens only). Virtual row v is packed sample 2v (chosen) or 2(v-B)+1 (rejected).
        to_packed = torch.cat([torch.arange(B) * 2, torch.arange(B) * 2 + 1])
        src = torch.zeros((2 * B, L - 1), dtype=torch.long)
        src[s, rows.pred_pos[s, t]] = packed.pred_pos[to_packed][s, t]
        batch = {
            "input_ids": rows.input_ids, "attention_mask": rows.attention_mask, "completion_mask": completion,
            "packed_input_ids": packed.input_ids, "packed_position_ids": packed.position_ids,
            "packed_attention_mask": packed.attention_mask, "packed_src": src,
            # The last token of each answer (chosen, rejected): in the packed row, and in its own row.
            "packed_ends": packed.ends.view(B, 2), "row_ends": torch.stack(rows.ends.chunk(2), 1),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        if "label" in examples[0]:  # KTO's rows: thumbs up (chosen slot = the row's answer) or down
            batch["label"] = torch.tensor([bool(e["label"]) for e in examples], device="cpu")  # moved with the batch
        return batch


def answer_end_states(lm, batch: dict) -> torch.Tensor:
    """Hidden states (B, 2, H) at the last token of the chosen and the rejected answer -- what a
    reward model scores -- from one packed row per pair where that is exact, else from two
    ordinary rows per pair (:func:`packing_blocker`)."""
    if packing_blocker(lm.config, batch["packed_position_ids"]) is None:
        mask = attention_mask_for(lm.config, batch["packed_attention_mask"], lm.get_input_embeddings().weight.dtype)
        return states_at(lm, batch["packed_ends"], input_ids=batch["packed_input_ids"],
                         position_ids=batch["packed_position_ids"], attention_mask=mask)
    ends = batch["row_ends"]  # rows 0..B-1 the chosen answers, B..2B-1 the rejected ones
    states = states_at(lm, torch.cat([ends[:, 0], ends[:, 1]]), input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"])
    return torch.stack(states.chunk(2), 1)


def length_order(pairs, collator: PackedPairCollator) -> list[int]:
    """Indices of tokenized ``pairs`` by packed length: scored in this order batches pad little;
    the scores are put back in data order."""
    return sorted(range(len(pairs)), key=lambda i: packed_length(
        len(pairs[i]["prompt_ids"]), len(pairs[i]["chosen_ids"]), len(pairs[i]["rejected_ids"]),
        collator.max_length, collator.max_prompt_length))


def install_packed_forward(model) -> None:
    """Make ``model(..., labels, fused_lm_head=True, packed_*)`` score packed pairs.

    ``model`` is the bare causal LM (PEFT's base model); its LoRA layers stay in place, so
    the adapter (or its absence, for the reference) is honoured. Without ``fused_lm_head``
    the model's own forward runs, so generation is unchanged. Where packing would not be exact
    (:func:`packing_blocker`) the batch is scored as two ordinary rows per pair instead -- the
    same numbers, more compute -- and a notice says so once.
    """
    plain_forward = type(model).forward.__get__(model)
    noticed = set()

    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None,
                packed_input_ids=None, packed_position_ids=None, packed_attention_mask=None,
                packed_src=None, packed_ends=None, row_ends=None, **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            return plain_forward(*args, **kwargs)
        if packed_input_ids is None:
            raise ValueError("packed forward needs the PackedPairCollator's packed_* tensors")
        input_ids, attention_mask = kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None)
        kwargs["use_cache"] = False
        why = packing_blocker(self.config, packed_position_ids)
        if why is not None:  # two rows per pair: the virtual layout the collator also emits
            if why not in noticed:
                noticed.add(why)
                print(f"notice: {why}: scoring each pair as two rows, not one packed row (exact, slower)")
            hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            rows_src = torch.arange(input_ids.size(1) - 1, device=hidden.device).expand(input_ids.size(0), -1)
            return score_labels(self, hidden, labels, rows_src, num_items_in_batch)
        mask = attention_mask_for(self.config, packed_attention_mask, self.get_input_embeddings().weight.dtype)
        hidden = self.base_model(
            input_ids=packed_input_ids, position_ids=packed_position_ids, attention_mask=mask, **kwargs,
        ).last_hidden_state
        return score_labels(self, hidden, labels, packed_src, num_items_in_batch)

    model.forward = types.MethodType(forward, model)


def score_labels(model, hidden, labels, packed_src, num_items_in_batch=None):
    """Gather the hidden states that predict each scored label and project only those."""
    B2 = labels.size(0)
    B = hidden.size(0)
    shift = labels[:, 1:]
    mask = shift != -100
    rows = torch.arange(B2, device=hidden.device).unsqueeze(1).expand_as(shift) % B
    h = hidden[rows[mask], packed_src[mask]]  # (N, H)
    lm_head = model.get_output_embeddings()
    logits = F.linear(h, lm_head.weight, lm_head.bias).float()
    targets = shift[mask]
    logp, ent = token_logprobs(logits, targets, with_entropy=True, entropy_grad=False)
    with torch.no_grad():
        mean_logits = logits.mean(-1)
        is_top1 = logits.argmax(-1) == targets

    def scatter(x):  # back to the virtual (rows, L-1) layout TRL reads; zeros elsewhere
        return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)

    log_probs = scatter(logp)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return fused_lm_output(
        loss=-log_probs.sum() / denom,
        log_probs=log_probs,
        entropy=scatter(ent),
        log_sum_sq_probs=None,
        mean_logits=scatter(mean_logits),
        is_top1=scatter(is_top1),
        label_mask=mask,
        aux_loss=None,
    )


def install_packed_scorer(seqcls) -> None:
    """``model(packed_input_ids=..., ...)`` returns the (B, 2) scores of each pair's chosen and
    rejected conversation; without ``packed_input_ids`` the classifier's own forward runs."""
    plain_forward = type(seqcls).forward.__get__(seqcls)

    def forward(self, *args, packed_input_ids=None, **kwargs):
        if packed_input_ids is None:
            return plain_forward(*args, **kwargs)
        states = answer_end_states(self, {"packed_input_ids": packed_input_ids, **kwargs})
        return self.score(states).squeeze(-1).float()

    seqcls.forward = types.MethodType(forward, seqcls)


@dataclass
class PairScores:
    chosen_logp: torch.Tensor    # summed log-prob of each chosen answer
    rejected_logp: torch.Tensor
    chosen_tokens: torch.Tensor  # number of scored tokens
    rejected_tokens: torch.Tensor


def placed_batch(collator, rows, model) -> dict:
    """A collated batch on the model's device: the one place scoring moves data to the model
    (collators build on the CPU, where the tokenized rows are)."""
    from ..placement import model_device, to_device

    return to_device(collator(rows), model_device(model))


def packed_pair_logps(model, batch: dict) -> tuple[torch.Tensor, ...]:
    """(chosen log-probs, rejected log-probs, chosen tokens, rejected tokens), one entry per pair
    of a :class:`PackedPairCollator` batch, through the packed forward
    (:func:`install_packed_forward`); differentiable when grad is on."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    res = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=labels, fused_lm_head=True, **{k: batch[k] for k in PACKED_KEYS})
    logps, n = res.log_probs.sum(1), res.label_mask.sum(1)
    B = len(logps) // 2
    return logps[:B], logps[B:], n[:B], n[B:]


@torch.no_grad()
def score_pairs(model, dataset, collator: PackedPairCollator, batch_size: int = 8,
                desc: str = "scoring") -> PairScores:
    """Summed log-probs of chosen/rejected for every tokenized pair, in dataset order (on the CPU)."""
    was_training = model.training
    model.eval()
    out = {k: [] for k in ("c", "r", "cn", "rn")}
    rows = [dataset[i] for i in range(len(dataset))]
    # Score in length order (little padding), then put results back in dataset order.
    order = length_order(rows, collator)
    rows = [rows[i] for i in order]
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        scores = packed_pair_logps(model, placed_batch(collator, rows[start:start + batch_size], model))
        for k, v in zip(("c", "r", "cn", "rn"), scores):
            out[k].append(v)
    model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long, device="cpu")
    inverse[torch.tensor(order, dtype=torch.long, device="cpu")] = torch.arange(len(order), device="cpu")
    cat = {k: torch.cat(v).float().cpu()[inverse] for k, v in out.items()}  # one copy to the host
    return PairScores(cat["c"], cat["r"], cat["cn"], cat["rn"])


def implicit_reward_metrics(policy: PairScores, ref: PairScores, beta: float) -> dict:
    r_c = beta * (policy.chosen_logp - ref.chosen_logp)
    r_r = beta * (policy.rejected_logp - ref.rejected_logp)
    margin = r_c - r_r
    return {"implicit_accuracy": tie_half_accuracy(margin),
            "mean_margin": float(margin.mean()),
            "reward_chosen": float(r_c.mean()), "reward_rejected": float(r_r.mean())}


def normalized_margin_accuracy(policy: PairScores, ref: PairScores) -> float:
    """Share of pairs (ties 1/2) whose chosen answer gained more per-token log-probability over
    the reference than the rejected one: ``(pi_c - ref_c) / |c| > (pi_r - ref_r) / |r|``. The
    implicit reward's sign without its bias towards the longer answer (summed log-ratios grow with
    length) -- one yardstick for methods trained with and without length normalisation."""
    c = (policy.chosen_logp - ref.chosen_logp) / policy.chosen_tokens.clamp(min=1)
    r = (policy.rejected_logp - ref.rejected_logp) / policy.rejected_tokens.clamp(min=1)
    return tie_half_accuracy(c - r)


def per_pair_marks(policy: PairScores, ref: PairScores) -> dict[str, list[float]]:
    """Each pair's mark (1 right, 1/2 tie, 0 wrong) by the implicit reward, the length-normalised
    margin and the policy's own per-token margin (the reference-free objectives' yardstick): what
    a paired interval between two methods scored on the same pairs needs
    (:func:`align.scoring.stats.paired_difference`)."""
    def marks(margin):
        return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margin.tolist()]

    gain = lambda side: (getattr(policy, f"{side}_logp") - getattr(ref, f"{side}_logp")) \
        / getattr(policy, f"{side}_tokens").clamp(min=1)  # noqa: E731 -- as normalized_margin_accuracy
    return {"implicit": marks((policy.chosen_logp - ref.chosen_logp) - (policy.rejected_logp - ref.rejected_logp)),
            "normalized": marks(gain("chosen") - gain("rejected")),
            "reference_free_normalized": marks(policy.chosen_logp / policy.chosen_tokens.clamp(min=1)
                                               - policy.rejected_logp / policy.rejected_tokens.clamp(min=1))}


def reference_free_accuracy(s: PairScores) -> float:
    mean_c = s.chosen_logp / s.chosen_tokens.clamp(min=1)
    mean_r = s.rejected_logp / s.rejected_tokens.clamp(min=1)
    return tie_half_accuracy(mean_c - mean_r)


@torch.no_grad()
def pair_scores(model, pairs: list[dict], collator: PackedPairCollator, batch_size: int = 8) -> torch.Tensor:
    """(N, 2) scores [chosen, rejected] of tokenized pairs, in their order (batched by length)."""
    was_training = model.training
    model.eval()
    order = length_order(pairs, collator)
    out = torch.empty(len(pairs), 2, device="cpu")  # filled from each batch's .cpu()
    for s in tqdm(range(0, len(order), batch_size), desc="reward-model scores", leave=False):
        idx = order[s:s + batch_size]
        batch = placed_batch(collator, [pairs[i] for i in idx], model)
        out[idx] = model(**batch).float().cpu()
    model.train(was_training)
    return out


def pairwise_metrics(scores: torch.Tensor) -> dict:
    margin = scores[:, 0] - scores[:, 1]
    return {"pairs": len(scores), "pairwise_accuracy": tie_half_accuracy(margin),
            "mean_margin": float(margin.mean()), "score_mean": float(scores.mean()),
            "score_std": float(scores.std()) if scores.numel() > 1 else 0.0}
