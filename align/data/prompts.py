"""Prompt datasets for PPO: any JSONL/Parquet/Hub dataset with a prompt field (a string or
chat messages), HH-RLHF's dialogues (their prompts), or IMDB review openings."""
from __future__ import annotations

import random
import re
from pathlib import Path

from ..assets import check_hub, resolve_dataset
from .hh_rlhf import find_subset_file
from .preference import read_preference_jsonl
from .rows import DataError, LoadReport, iter_jsonl


def _text(value, where: str, field: str) -> str | list:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        return value
    raise DataError(f"{where}: field '{field}' must be a string or a list of {{role, content}} messages")


def _read_rows(path: Path, field: str):
    if path.name.endswith(".parquet"):
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        for i, row in enumerate(ds):
            yield f"{path}[row {i}]", row
        return
    yield from iter_jsonl(path, LoadReport(), strict=True)  # a malformed line is an error here


def load_prompts(cfg) -> tuple[list[dict], list[dict]]:
    """(train, eval) lists of ``{"messages": [...], "source": where}`` from a PromptDataConfig."""
    if not cfg.dataset:
        raise DataError("data.dataset is not set: name your prompts (a .jsonl/.parquet file or folder, "
                        "a Hub id), e.g. data.dataset=my_prompts.jsonl, or run the demo with "
                        "--config configs/ppo_imdb_sentiment.yaml")
    root = Path(resolve_dataset(cfg.dataset))
    prompts: list[tuple[str, str | list]] = []
    is_hh = root.is_dir() and any((root / s).is_dir() for s in ("helpful-base", "harmless-base"))
    if is_hh:
        prompts = _hh_prompts(root, cfg.subsets or ["helpful-base"])
    else:
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz", ".parquet")))
        elif root.is_file():
            files = [root]
        else:
            import datasets

            check_hub(cfg.dataset, "dataset")
            ds = datasets.load_dataset(cfg.dataset, split="train")
            files = []
            prompts = [(f"{cfg.dataset}[row {i}]", _text(r.get(cfg.text_field), f"{cfg.dataset}[row {i}]",
                                                            cfg.text_field)) for i, r in enumerate(ds)]
        if root.exists() and not files:
            raise DataError(f"prompt dataset '{root}' has no .jsonl/.parquet files")
        for path in files:
            for where, row in _read_rows(path, cfg.text_field):
                if not isinstance(row, dict) or cfg.text_field not in row:
                    raise DataError(f"{where}: missing field '{cfg.text_field}' (data.text_field)")
                prompts.append((where, _text(row[cfg.text_field], where, cfg.text_field)))
    stop = cfg.rows_stop or len(prompts)
    total, prompts = len(prompts), prompts[cfg.rows_start:stop]
    if not prompts:
        raise DataError(f"prompt dataset '{cfg.dataset}' has {total} rows, none in data.rows_start:"
                        f"data.rows_stop = [{cfg.rows_start}:{stop}) (for all rows: data.rows_start=0 "
                        "data.rows_stop=0)")
    out = [{"messages": _to_messages(p, cfg), "source": where} for where, p in prompts]
    random.Random(cfg.seed).shuffle(out)
    if cfg.eval_subsets:  # held out by subset: prompts the policy never trains on
        if not is_hh:
            raise DataError("data.eval_subsets names HH-RLHF subsets; data.dataset is not HH-RLHF")
        if set(cfg.eval_subsets) & set(cfg.subsets):
            raise DataError(f"data.eval_subsets overlaps data.subsets: {sorted(set(cfg.eval_subsets) & set(cfg.subsets))}")
        held = [{"messages": p, "source": w} for w, p in _hh_prompts(root, cfg.eval_subsets)]
        random.Random(cfg.seed + 1).shuffle(held)
        return out, held[:cfg.eval_prompts]
    n_eval = min(cfg.eval_prompts, len(out) // 2)
    return out[n_eval:], out[:n_eval]


def _hh_prompts(root: Path, subsets: list[str]) -> list[tuple[str, list]]:
    """The dialogue up to its last user turn, from each HH-RLHF pair (a prompt once per pair)."""
    out = []
    for subset in subsets:
        rows, _ = read_preference_jsonl(find_subset_file(root, subset, "train"))
        out += [(r["source"], r["prompt"]) for r in rows]
    return out


def _to_messages(p, cfg) -> list[dict]:
    if isinstance(p, list):
        return p
    text = re.sub(r"\s+", " ", p.replace("<br />", " ")).strip()
    if cfg.first_words:
        text = " ".join(text.split()[: cfg.first_words])
    return [{"role": "user", "content": cfg.template.format(text=text)}]
