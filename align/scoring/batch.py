"""What a model reads for a batch of answers to score, and where it reads each answer.

Two layouts, one interface. ``rows``: one right-padded row per answer (prompt + answer).
``packed``: one row per *prompt* holding all k of its answers (:func:`align.scoring.packing.packed_group`),
so the prompt is computed once instead of k times -- with long prompts and k >= 2 the larger
part of PPO's scoring and update compute. Used by PPO (experience, update, evaluation) and by
the reward kinds and `align eval`; DPO's and the reward model's pairs are groups of two answers
built by the same functions (:class:`align.scoring.pairs.PackedPairCollator`). Either way
``pred_pos[s, t]`` is the row position whose hidden state predicts answer token t of sample s,
``ends[s]`` the position of its last token (where a reward model reads its score) and ``row[s]``
its row; the log-probs, values and gradients are the same (tests/test_ppo.py pins it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import attention_mask_for, packed_group, packing_blocker


@dataclass
class TokenBatch:
    input_ids: torch.Tensor        # (R, L)
    attention_mask: torch.Tensor   # (R, L) for rows, (R, 1, L, L) boolean for packed rows
    position_ids: torch.Tensor | None  # (R, L) for packed rows
    row: torch.Tensor              # (B,) the row holding sample s
    pred_pos: torch.Tensor         # (B, T) position predicting answer token t
    targets: torch.Tensor          # (B, T) answer token ids (pad where mask is 0)
    mask: torch.Tensor             # (B, T) 1.0 on real answer tokens
    row_tokens: torch.Tensor | None = None  # (R,) real tokens of each row (for compute accounting)
    ends: torch.Tensor | None = None  # (B,) position of the answer's last token (the prompt's for an empty answer)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def __len__(self) -> int:
        return self.targets.size(0)

    def select(self, idx: torch.Tensor) -> "TokenBatch":
        """The samples ``idx`` (and only the rows they need)."""
        rows, new_row = torch.unique(self.row[idx], return_inverse=True)
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows],
                          None if self.position_ids is None else self.position_ids[rows],
                          new_row, self.pred_pos[idx], self.targets[idx], self.mask[idx],
                          None if self.row_tokens is None else self.row_tokens[rows.cpu()],
                          None if self.ends is None else self.ends[idx])

    @property
    def tokens(self) -> int:
        """Real (not padding) tokens the model reads: what its compute is proportional to."""
        return int(self.row_tokens.sum()) if self.row_tokens is not None else self.input_ids.numel()

    def model_inputs(self, config, dtype) -> dict:
        """The backbone's keyword arguments, the mask in the form its attention backend applies."""
        if not self.packed:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": attention_mask_for(config, self.attention_mask, dtype)}

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(None if t is None else t.to(device) for t in
                            (self.input_ids, self.attention_mask, self.position_ids, self.row,
                             self.pred_pos, self.targets, self.mask)), row_tokens=self.row_tokens,
                          ends=None if self.ends is None else self.ends.to(device))


@dataclass(frozen=True)
class Answer:
    """One answer to lay out: its prompt's token ids and its own (what the builders below read;
    a rollout's ``Completion`` has the same two fields)."""
    prompt_ids: list[int]
    token_ids: list[int]


def states_at(lm, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """The backbone's last hidden states at ``positions`` of each row of ``inputs`` (``positions``
    (R,) or (R, k)). ``lm`` is a transformers model whose ``base_model`` is the backbone (a causal
    LM or a classifier)."""
    hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.size(0), device=hidden.device)
    return hidden[rows[:, None] if positions.dim() == 2 else rows, positions]


def end_states(lm, tb: TokenBatch) -> torch.Tensor:
    """Hidden states (B, H) at each answer's last token, in either layout: what a reward model
    scores."""
    hidden = lm.base_model(**tb.model_inputs(lm.config, lm.get_input_embeddings().weight.dtype),
                           use_cache=False).last_hidden_state
    return hidden[tb.row, tb.ends]


def in_chunks(fn, tb: TokenBatch, size: int, group: int = 1):
    """``fn(sub_batch)`` -> a tuple of (b, T) tensors (or None), run over contiguous chunks of
    ``size`` samples (whole groups of ``group``) and concatenated: the same numbers as one pass,
    with the activations and LM-head logits of one chunk alive at a time (no-grad scoring's
    peak memory). ``size`` 0 = one pass."""
    if not size or size >= len(tb):
        return fn(tb)
    step = max(group, size // group * group)
    outs = [fn(tb.select(torch.arange(s, min(s + step, len(tb)), device=tb.row.device)))
            for s in range(0, len(tb), step)]
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))


def length_sorted_chunks(lengths: list[int], size: int) -> list[list[int]]:
    """Indices in chunks of ``size``, longest first: a chunk's rows pad to similar lengths.
    Scoring rows of very different lengths (HH dialogues run from ~40 to ~700 tokens) in input
    order pads every row to its chunk's longest: 3x the positions on HH prompts."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + size] for s in range(0, len(order), max(1, size))]


def score_by_length(score_chunk, lengths: list[int], size: int) -> list[float]:
    """``score_chunk(indices)`` -> one float per index, run over :func:`length_sorted_chunks`;
    the scores come back in input order."""
    out = [0.0] * len(lengths)
    for idx in length_sorted_chunks(lengths, size):
        for i, v in zip(idx, score_chunk(idx)):
            out[i] = v
    return out


def _answers(completions, pad_id: int):
    T = max(1, max(len(c.token_ids) for c in completions))
    targets = torch.full((len(completions), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), T))
    for i, c in enumerate(completions):
        if c.token_ids:
            targets[i, :len(c.token_ids)] = torch.tensor(c.token_ids)
            mask[i, :len(c.token_ids)] = 1
    return targets, mask


def rows_batch(completions, pad_id: int, device=None) -> TokenBatch:
    """One right-padded row (prompt + answer) per sample."""
    B = len(completions)
    L = max(len(c.prompt_ids) + len(c.token_ids) for c in completions)
    targets, mask = _answers(completions, pad_id)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pred_pos = torch.zeros(targets.shape, dtype=torch.long)
    for i, c in enumerate(completions):
        P, C = len(c.prompt_ids), len(c.token_ids)
        ids[i, :P + C] = torch.tensor(c.prompt_ids + c.token_ids)
        attn[i, :P + C] = 1
        pred_pos[i] = (torch.arange(targets.size(1)) + P - 1).clamp(max=L - 1)
    lengths = torch.tensor([len(c.prompt_ids) + len(c.token_ids) for c in completions])
    tb = TokenBatch(ids, attn, None, torch.arange(B), pred_pos, targets, mask, lengths, ends=lengths - 1)
    return tb.to(device) if device is not None else tb


def packed_batch(completions, group_size: int, pad_id: int, device=None) -> TokenBatch:
    """One row per prompt: samples ``[g*k, (g+1)*k)`` share group g's prompt."""
    B = len(completions)
    groups = [completions[g:g + group_size] for g in range(0, B, group_size)]
    if any(c.prompt_ids != grp[0].prompt_ids for grp in groups for c in grp):
        raise ValueError(f"packed_batch: samples must come in groups of {group_size} sharing one prompt")
    built = [packed_group(grp[0].prompt_ids, [c.token_ids for c in grp]) for grp in groups]
    L = max(len(ids) for ids, _, _, _ in built)
    targets, mask = _answers(completions, pad_id)
    ids_t = torch.full((len(groups), L), pad_id, dtype=torch.long)
    pos_t = torch.zeros((len(groups), L), dtype=torch.long)
    attn = torch.zeros((len(groups), 1, L, L), dtype=torch.bool)
    attn[:, 0] = torch.eye(L, dtype=torch.bool)  # padding positions attend to themselves
    pred_pos = torch.zeros(targets.shape, dtype=torch.long)
    ends = torch.zeros(B, dtype=torch.long)
    for g, (ids, pos, m, starts) in enumerate(built):
        n = len(ids)
        ids_t[g, :n], pos_t[g, :n] = torch.tensor(ids), torch.tensor(pos)
        attn[g, 0, :n, :n] = m
        P = len(groups[g][0].prompt_ids)
        for j, start in enumerate(starts):
            s = g * group_size + j
            # token 0 of an answer is predicted by the prompt's last position, token t by its own t-1
            t = torch.arange(targets.size(1))
            pred_pos[s] = torch.where(t == 0, torch.full_like(t, P - 1), start + t - 1).clamp(max=L - 1)
            n = len(groups[g][j].token_ids)
            ends[s] = start + n - 1 if n else P - 1
    row = torch.arange(B) // group_size
    tb = TokenBatch(ids_t, attn, pos_t, row, pred_pos, targets, mask, torch.tensor([len(b[0]) for b in built]), ends)
    return tb.to(device) if device is not None else tb


def make_batch(completions, group_size: int, pad_id: int, config, device=None, pack: bool = True) -> TokenBatch:
    """Packed rows when they are exact for this model and ``pack``, else one row per sample.
    Samples must be grouped by prompt (``group_size`` contiguous answers to one prompt)."""
    if pack and group_size > 1:
        longest = max(len(c.prompt_ids) + len(c.token_ids) for c in completions)
        if packing_blocker(config, torch.tensor([longest - 1])) is None:
            return packed_batch(completions, group_size, pad_id, device)
    return rows_batch(completions, pad_id, device)
