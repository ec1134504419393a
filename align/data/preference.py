"""Preference pairs in TRL's standard formats, from local JSONL/Parquet or the Hub.

Accepted rows (TRL's "preference" type):
  explicit prompt   {"prompt": str | messages, "chosen": str | messages, "rejected": ...}
  implicit prompt   {"chosen": messages, "rejected": messages}  (shared turns become the prompt)
Conversational rows come out as ``prompt`` = messages, ``chosen``/``rejected`` = one assistant
message each; plain-text rows stay plain strings (no chat template is applied to them).
"""
from __future__ import annotations

from pathlib import Path

from .hh_rlhf import split_pair
from .rows import DataError, LoadReport, collect_pairs, iter_jsonl


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in x
    )


def normalize_pair(row: dict) -> dict:
    """One row in any supported format -> our normal form; ValueError says what is wrong. A pair
    whose two answers are the same says nothing about preference (its DPO/RM loss only adds
    noise): refused here, for every format alike."""
    pair = _normal_form(row)
    if _answer_text(pair["chosen"]) == _answer_text(pair["rejected"]):
        raise ValueError("identical answers: chosen and rejected are the same")
    return pair


def _answer_text(answer) -> str:
    return answer if isinstance(answer, str) else str(answer[-1]["content"])


def _normal_form(row: dict) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"row is not an object: {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"missing field: {', '.join(repr(m) for m in missing)}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return split_pair(chosen, rejected)  # HH-style transcripts
        if not (_is_messages(chosen) and _is_messages(rejected)):
            raise ValueError("implicit-prompt rows need 'chosen'/'rejected' as message lists")
        n = len(chosen) - 1
        if n < 1 or chosen[:n] != rejected[:-1] or len(rejected) != len(chosen):
            raise ValueError("prompt mismatch: chosen and rejected differ before the final turn")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if isinstance(prompt, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise ValueError("plain 'prompt' needs plain-string 'chosen' and 'rejected'")
        if not prompt.strip():
            raise ValueError("empty turn: empty prompt")
        if not chosen.strip() or not rejected.strip():
            raise ValueError("empty turn: empty answer")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not _is_messages(prompt) or not prompt:
        raise ValueError("'prompt' must be a string or a non-empty list of {role, content}")
    out = {"prompt": prompt}
    for key, ans in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(ans, str):
            ans = [{"role": "assistant", "content": ans}]
        if not _is_messages(ans) or len(ans) != 1 or ans[0]["role"] != "assistant":
            raise ValueError(f"'{key}' must be one assistant message (or a string)")
        if not str(ans[0]["content"]).strip():
            raise ValueError(f"empty turn: empty '{key}' answer")
        out[key] = [{"role": "assistant", "content": ans[0]["content"]}]
    return out


def read_preference_jsonl(path: Path, strict: bool = False, limit: int = 0):
    report = LoadReport()
    return collect_pairs(iter_jsonl(path, report, strict), normalize_pair, report, strict, limit), report


def read_preference_records(records, origin: str, strict: bool = False, limit: int = 0):
    """Rows from Parquet or a Hub dataset (no line numbers there: row index instead)."""
    report = LoadReport()
    items = ((f"{origin}[row {i}]", dict(row)) for i, row in enumerate(records))
    return collect_pairs(items, normalize_pair, report, strict, limit), report


def read_preference_file(path: Path, strict: bool = False, limit: int = 0):
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        return read_preference_jsonl(path, strict, limit)
    if name.endswith(".parquet"):
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return read_preference_records(ds, str(path), strict, limit)
    raise DataError(f"{path}: unsupported file type (use .jsonl, .jsonl.gz or .parquet)")
