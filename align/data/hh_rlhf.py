"""Anthropic HH-RLHF: ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` transcripts -> chat messages.

Each row holds two whole dialogues, ``chosen`` and ``rejected``, that should share every turn
but the last assistant one. The prompt is those shared turns; chosen/rejected are the two final
assistant turns. Rows that break this (different earlier turns, empty turns, bad JSON, text
that is not an HH transcript) raise ValueError here; the readers in :mod:`align.data.preference`
count them in a ``LoadReport`` with file and line and skip them (or raise under ``strict``).
An HH row is an implicit-prompt preference row, so it is read like any other.
"""
from __future__ import annotations

import re
from pathlib import Path

from .rows import DataError

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{role: user, content: a}, ...]``.

    Raises ValueError for text that is not an HH transcript or has an empty turn.
    """
    if not isinstance(text, str):
        raise ValueError(f"not a string: {type(text).__name__}")
    pieces = _TURN.split(text)
    # pieces = [before, role, content, role, content, ...]
    if len(pieces) < 3 or pieces[0].strip():
        raise ValueError("not an HH transcript (expected it to start with '\\n\\nHuman:')")
    messages = []
    for role, content in zip(pieces[1::2], pieces[2::2]):
        content = content.strip()
        if not content:
            raise ValueError(f"empty turn: an empty {role} turn")
        if messages and messages[-1]["role"] == _ROLE[role]:
            # Rare in the data: two turns of one speaker in a row. Keep them as one turn.
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": _ROLE[role], "content": content})
    return messages


def split_pair(chosen: str, rejected: str) -> dict:
    """One HH row -> ``{prompt: [...], chosen: [assistant msg], rejected: [assistant msg]}``."""
    c, r = parse_transcript(chosen), parse_transcript(rejected)
    for name, msgs in (("chosen", c), ("rejected", r)):
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"no final answer: {name} does not end with an Assistant turn")
        if len(msgs) < 2:
            raise ValueError(f"no prompt: {name} has no Human turn before its answer")
    if c[:-1] != r[:-1]:
        raise ValueError("prompt mismatch: chosen and rejected differ before the final turn")
    return {"prompt": c[:-1], "chosen": [c[-1]], "rejected": [r[-1]]}


def find_subset_file(root: Path, subset: str, split: str = "test") -> Path:
    """``<root>/<subset>/<split>.jsonl.gz`` (or ``.jsonl``), with an error that lists choices."""
    for suffix in (".jsonl.gz", ".jsonl"):
        path = root / subset / f"{split}{suffix}"
        if path.is_file():
            return path
    available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    # Only the official test splits exist offline: fall back to any split the subset has.
    sub = root / subset
    if sub.is_dir():
        files = sorted(sub.glob("*.jsonl*"))
        if files:
            return files[0]
    raise DataError(
        f"HH-RLHF subset '{subset}' not found under '{root}' (available: {', '.join(available) or 'none'})"
    )
