"""Prompt datasets for PPO: any JSONL/Parquet/Hub dataset with a prompt field (a string or
chat messages), HH-RLHF's dialogues (their prompts), IMDB review openings, or the built-in
``arithmetic`` task (:mod:`align.data.arithmetic`).

A row's other fields (a reference ``answer``, a ``solution``, test cases...) travel with its
prompt as ``fields`` and reach the reward function as keyword arguments, one value per
completion -- TRL's convention, so TRL reward functions run unchanged."""
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


# The keywords align itself gives a reward function: a row field of the same name would be
# ambiguous, so it is an error that names both.
REWARD_KEYWORDS = ("prompts", "completions", "messages", "truncated", "prompt_ids", "completion_ids")
BUILTIN_TASKS = ("arithmetic",)  # generated training prompts
# Fixed held-out sets: the task's default eval_dataset, every 4th of its problems (25 of each
# kind: the smoke run's quick yardstick, a subset of the same fixed file), a 1,000-problem
# superset of it for studies of many runs, and a validation set to tune on (in neither)
BUILTIN_HELDOUT = ("arithmetic-heldout", "arithmetic-heldout-100", "arithmetic-heldout-1000", "arithmetic-validation")


def is_builtin(name: str) -> bool:
    """A built-in task or held-out set (a file or folder of that name takes precedence)."""
    return name in BUILTIN_TASKS + BUILTIN_HELDOUT and not Path(name).exists()


def _prompt(where: str, row, cfg) -> tuple[str, str | list, dict]:
    """(where, the prompt, the row's other fields) of one row; a missing prompt field or a
    field named like a reward keyword is an error naming the row."""
    if not isinstance(row, dict) or cfg.text_field not in row:
        raise DataError(f"{where}: missing field '{cfg.text_field}' (data.text_field)")
    fields = {k: v for k, v in row.items() if k != cfg.text_field}
    clash = sorted(set(fields) & set(REWARD_KEYWORDS))
    if clash:
        raise DataError(f"{where}: field '{clash[0]}' has the name of align's own reward keyword "
                        f"'{clash[0]}' (reward/api.py): rename the field in the data")
    return where, _text(row[cfg.text_field], where, cfg.text_field), fields


def _rows_of(source: str, cfg) -> tuple[list[tuple[str, str | list, dict]], bool]:
    """Every prompt of ``source`` (a file/folder, a Hub id, HH-RLHF, a built-in task) and
    whether it is HH-RLHF."""
    if is_builtin(source) and source in BUILTIN_TASKS:
        from . import arithmetic

        n = cfg.rows_stop or 8000
        return [_prompt(f"arithmetic[train {i}]", r, cfg)
                for i, r in enumerate(arithmetic.make_train(n, cfg.seed))], False
    root = Path(resolve_dataset(source))
    if root.is_dir() and any((root / s).is_dir() for s in ("helpful-base", "harmless-base")):
        return [(w, p, {}) for w, p in _hh_prompts(root, cfg.subsets or ["helpful-base"])], True
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz", ".parquet")))
    elif root.is_file():
        files = [root]
    else:
        import datasets

        check_hub(source, "dataset")
        ds = datasets.load_dataset(source, split="train")
        return [_prompt(f"{source}[row {i}]", r, cfg) for i, r in enumerate(ds)], False
    if not files:
        raise DataError(f"prompt dataset '{root}' has no .jsonl/.parquet files")
    return [_prompt(where, row, cfg) for path in files for where, row in _read_rows(path, cfg.text_field)], False


def load_prompts(cfg) -> tuple[list[dict], list[dict]]:
    """(train, eval) lists of ``{"messages": [...], "source": where, "fields": {...}}`` from a
    PromptDataConfig. Held out: ``data.eval_dataset`` when set (the built-in task's fixed file
    for ``arithmetic``), else HH-RLHF's ``eval_subsets``, else the first ``eval_prompts`` rows."""
    if not cfg.dataset:
        raise DataError("data.dataset is not set: name your prompts (a .jsonl/.parquet file or folder, "
                        "a Hub id, or the built-in task 'arithmetic'), e.g. data.dataset=my_prompts.jsonl, "
                        "or run a demo: --config configs/grpo_arithmetic.yaml")
    prompts, is_hh = _rows_of(cfg.dataset, cfg)
    builtin = is_builtin(cfg.dataset)
    stop = 0 if builtin else cfg.rows_stop or len(prompts)
    total, prompts = len(prompts), prompts if builtin else prompts[cfg.rows_start:stop]
    if not prompts:
        raise DataError(f"prompt dataset '{cfg.dataset}' has {total} rows, none in data.rows_start:"
                        f"data.rows_stop = [{cfg.rows_start}:{stop}) (for all rows: data.rows_start=0 "
                        "data.rows_stop=0)")
    out = [_row(p, where, fields, cfg) for where, p, fields in prompts]
    random.Random(cfg.seed).shuffle(out)
    eval_source = cfg.eval_dataset or ("arithmetic-heldout" if builtin else "")
    if eval_source:
        held = load_heldout(eval_source, cfg)
        seen = {_key(r) for r in held}
        return [r for r in out if _key(r) not in seen], held[:cfg.eval_prompts or None]
    if cfg.eval_subsets:  # held out by subset: prompts the policy never trains on
        if not is_hh:
            raise DataError("data.eval_subsets names HH-RLHF subsets; data.dataset is not HH-RLHF")
        if set(cfg.eval_subsets) & set(cfg.subsets):
            raise DataError(f"data.eval_subsets overlaps data.subsets: {sorted(set(cfg.eval_subsets) & set(cfg.subsets))}")
        held = [_row(p, w, {}, cfg) for w, p in _hh_prompts(Path(resolve_dataset(cfg.dataset)), cfg.eval_subsets)]
        random.Random(cfg.seed + 1).shuffle(held)
        return out, held[:cfg.eval_prompts]
    n_eval = min(cfg.eval_prompts, len(out) // 2)
    return out[n_eval:], out[:n_eval]


def _row(p, where: str, fields: dict, cfg) -> dict:
    return {"messages": _to_messages(p, cfg), "source": where, "fields": fields}


def _key(row: dict) -> str:
    """A prompt's identity for keeping held-out prompts out of training: its text, normalised."""
    from .arithmetic import normalise

    return normalise(" ".join(str(m["content"]) for m in row["messages"]))


def load_heldout(source: str, cfg) -> list[dict]:
    """The held-out prompts of ``source`` (``data.eval_dataset``, `align eval --accuracy`), in
    file order (a fixed set is not shuffled: its first ``eval_prompts`` are the same in every run)."""
    if is_builtin(source) and source in BUILTIN_HELDOUT:
        from .arithmetic import HELDOUT_1000_FILE, HELDOUT_FILE, VALIDATION_FILE

        path = {"arithmetic-heldout-1000": HELDOUT_1000_FILE, "arithmetic-validation": VALIDATION_FILE}.get(source, HELDOUT_FILE)
        rows, _ = _rows_of(str(path), cfg)
        rows = rows[::4] if source.endswith("-100") else rows
    else:
        rows, _ = _rows_of(source, cfg)
    return [_row(p, where, fields, cfg) for where, p, fields in rows]


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
