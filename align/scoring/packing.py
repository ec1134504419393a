"""Packed rows: one prompt, several answers, one row -- the prompt's compute paid once.

A row ``prompt + answer_1 + ... + answer_k`` gives every answer the positions it would have
after the prompt alone, and a 4-D mask lets each answer see the prompt and its own earlier
tokens only. The hidden states are then exactly those of k separate rows (tests pin this for
every architecture in tests/test_architectures.py). DPO packs (chosen, rejected) pairs this way
(:mod:`align.scoring.pairs`); PPO packs the k samples of each prompt (:mod:`align.scoring.batch`).

Where a packed row would not be exact -- an attention backend that takes no custom mask, or a
sliding window shorter than the row -- callers fall back to separate rows
(:func:`packing_blocker` says why).
"""
from __future__ import annotations

import torch

# Backends that take an arbitrary 4-D mask: sdpa (boolean, True = attend) and eager (which ADDS
# the mask to the scores, so it must be additive: 0 or -inf -- a boolean one silently becomes
# +1/0 there and every token sees every other). FlashAttention-2 and flex take no such mask.
PACKABLE_ATTENTION = ("sdpa", "eager")


def sliding_window(config) -> int | None:
    """The attention window some layer of this model uses, or None (all layers see everything)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types_ = getattr(config, "layer_types", None)
    if types_ is not None:
        return window if "sliding_attention" in types_ else None
    return None if getattr(config, "use_sliding_window", True) is False else window


def packing_blocker(config, packed_position_ids: torch.Tensor) -> str | None:
    """Why a packed batch would not be exact for this model (None: it is). A user-supplied 4-D
    mask replaces the model's own masks, sliding-window ones included, so a window shorter than
    the rows makes packing inexact too."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in PACKABLE_ATTENTION:
        return f"attention backend '{impl}' takes no custom 4-D mask"
    window = sliding_window(config)
    longest = int(packed_position_ids.max()) + 1
    if window and longest > window:
        return f"the model's sliding window ({window}) is shorter than a row ({longest} tokens)"
    return None


def attention_mask_for(config, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The packed row's boolean mask in the form the model's backend applies correctly."""
    if (getattr(config, "_attn_implementation", None) or "eager") == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def packed_group(prompt: list[int], answers: list[list[int]]):
    """One row for a prompt and its answers: (token ids, position ids, boolean attention mask
    (n, n), and for each answer the index of its first token in the row)."""
    P = len(prompt)
    ids, pos, starts = list(prompt), list(range(P)), []
    for a in answers:
        starts.append(len(ids))
        ids += a
        pos += range(P, P + len(a))
    n = len(ids)
    mask = torch.ones((n, n), dtype=torch.bool).tril()
    for i, (s, a) in enumerate(zip(starts, answers)):
        for s2, a2 in zip(starts[:i], answers[:i]):  # later answers never see earlier ones
            mask[s:s + len(a), s2:s2 + len(a2)] = False
    return ids, pos, mask, starts
