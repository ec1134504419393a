"""Data: HH-RLHF parsing, TRL preference formats, prompt datasets -- one entry point each."""
from __future__ import annotations

import random
import sys
from pathlib import Path

from ..assets import AssetError, check_hub, offline_hint, resolve_dataset
from .hh_rlhf import find_subset_file
from .rows import DataError, LoadReport
from .preference import read_preference_file, read_preference_jsonl, read_preference_records

__all__ = ["DataError", "LoadReport", "load_preference_split", "load_preference_splits"]


def _is_hh_folder(root: Path) -> bool:
    return root.is_dir() and any((root / s).is_dir() for s in ("helpful-base", "harmless-base"))


def row_half(source: str) -> str:
    """``half-a`` or ``half-b`` for a row, from a hash of its file name, folder and line (not the
    absolute path: the same row falls in the same half on every machine)."""
    import hashlib

    path, _, line = source.rpartition(":")
    key = f"{Path(path).parent.name}/{Path(path).name}:{line}"
    return "half-a" if hashlib.sha1(key.encode()).digest()[0] % 2 == 0 else "half-b"


def hold_out(rows: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(rows without the held-out ones, ``n`` seeded held-out rows): a validation split."""
    if not n:
        return rows, []
    if n >= len(rows):
        raise DataError(f"data.validation_pairs={n} leaves no training pairs (of {len(rows)})")
    idx = set(random.Random(seed + 7).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in idx], [r for i, r in enumerate(rows) if i in idx]


def _subsets_unused(dataset: str, subsets) -> None:
    if subsets:
        print(f"note: dataset '{dataset}' is not HH-RLHF: the subsets {list(subsets)} have no effect "
              "(data.train_subsets=[] data.eval_subsets=[] say so)", file=sys.stderr)


def load_preference_split(dataset: str, subsets: list[str], split: str, limit: int = 0,
                          strict: bool = False, seed: int = 0, rows_kept: str = "all"):
    """Pairs from ``dataset`` (HH folder + subsets, a file, a folder of files, or a Hub id).

    Returns (rows, report). ``rows_kept``: all, half-a or half-b (:func:`row_half`). With
    ``limit``, rows are an even, seeded sample across subsets.
    """
    where = resolve_dataset(dataset)
    root = Path(where)
    rows, report = [], LoadReport()
    if _is_hh_folder(root):
        if not subsets:
            raise DataError(f"dataset '{dataset}' is HH-RLHF: name its subsets (data.*_subsets)")
        for subset in subsets:
            got, rep = read_preference_jsonl(find_subset_file(root, subset, split or "train"), strict)
            rows += got
            report.merge(rep)
    elif root.is_file():
        _subsets_unused(dataset, subsets)
        rows, report = read_preference_file(root, strict)
    elif root.is_dir():
        _subsets_unused(dataset, subsets)
        files = sorted(p for p in root.rglob("*") if p.is_file() and
                       p.name.endswith((".jsonl", ".jsonl.gz", ".parquet")) and
                       (not split or p.name.startswith(split)))
        if not files:
            raise DataError(f"dataset folder '{root}' has no {split or ''}*.jsonl/.parquet files")
        for path in files:
            got, rep = read_preference_file(path, strict)
            rows += got
            report.merge(rep)
    else:
        rows, report = _load_from_hub(dataset, subsets, split or "train", strict)
    if rows_kept != "all":
        rows = [r for r in rows if row_half(r["source"]) == rows_kept]
    if limit and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    return rows, report


def _load_from_hub(dataset: str, subsets: list[str], split: str, strict: bool):
    import datasets

    check_hub(dataset, "dataset")
    rows, report = [], LoadReport()
    for subset in subsets or [None]:
        try:
            ds = datasets.load_dataset(dataset, data_dir=subset, split=split)
        except Exception as e:  # offline, unknown id, no such split
            raise AssetError(f"{offline_hint(dataset, 'dataset')} ({type(e).__name__}: {e})") from e
        got, rep = read_preference_records(ds, f"{dataset}/{subset or ''}:{split}", strict)
        rows += got
        report.merge(rep)
    return rows, report


def load_preference_splits(data_cfg):
    """(train_rows, eval_rows, {"train": report, "eval": report}) from a DataConfig; the reports
    are printed, and no usable training pair is an error.

    Evaluation is held out by *subset* for HH-RLHF (never the same dialogues as training);
    a subset named in both lists is an error.
    """
    overlap = set(data_cfg.train_subsets) & set(data_cfg.eval_subsets)
    if overlap:
        raise DataError(f"data.eval_subsets overlaps data.train_subsets: {sorted(overlap)}; "
                        "evaluation must be on pairs never trained on")
    train, train_rep = load_preference_split(
        data_cfg.dataset, data_cfg.train_subsets, data_cfg.train_split,
        data_cfg.max_train_pairs, data_cfg.strict, data_cfg.seed, getattr(data_cfg, "train_rows", "all"))
    eval_rows, eval_rep = [], LoadReport()
    if data_cfg.eval_subsets or data_cfg.eval_split:
        eval_rows, eval_rep = load_preference_split(
            data_cfg.dataset, data_cfg.eval_subsets, data_cfg.eval_split or data_cfg.train_split,
            data_cfg.max_eval_pairs, data_cfg.strict, data_cfg.seed + 1)
    reports = {"train": train_rep, "eval": eval_rep}
    for split, rep in reports.items():
        print(f"data[{split}]: {rep.summary()}")
        for ex in rep.examples[:3]:
            print(f"  e.g. {ex}")
    if not train:
        raise DataError(f"data.dataset '{data_cfg.dataset}': no usable training pairs")
    return train, eval_rows, reports
