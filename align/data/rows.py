"""Reading rows with a report: what was kept, what was skipped and where (file:line)."""
from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A bad row or file; the message names the file and line."""


@dataclass
class LoadReport:
    """What a loader kept and skipped, and where; printed in the run summary."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few "file:line: reason"

    def skip(self, where: str, reason: str, strict: bool) -> None:
        if strict:
            raise DataError(f"{where}: {reason}")
        self.skipped[reason.split(":")[0]] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {reason}")

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "LoadReport") -> None:
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])

    def summary(self) -> str:
        parts = [f"kept {self.kept}"]
        parts += [f"skipped {n} ({reason})" for reason, n in sorted(self.skipped.items())]
        return ", ".join(parts)


def open_text(path: Path):
    path = Path(path)
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of line 1's JSON
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else open(path, encoding="utf-8-sig")


def iter_jsonl(path: Path, report: LoadReport, strict: bool = False):
    """Yield ``(where, row)`` per JSON line; malformed lines are counted (or raise under strict).
    A file that ends early (a cut download, a truncated ``.gz``) is always an error naming the
    file and its last good line: silently training on part of a file is worse than stopping."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    report.skip(where, f"malformed JSON: {e.msg} at column {e.colno}", strict)
    except (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise DataError(f"{path}: truncated or corrupt after line {lineno} ({type(e).__name__}: {e}); "
                        "the file is incomplete, download or copy it again") from e


def collect_pairs(items, parse, report: LoadReport, strict: bool = False, limit: int = 0) -> list[dict]:
    """``parse(row)`` each ``(where, row)``; a ValueError skips the row with its reason."""
    out = []
    for where, row in items:
        if limit and report.kept >= limit:
            break
        try:
            pair = parse(row)
        except ValueError as e:
            report.skip(where, str(e), strict)
            continue
        pair["source"] = where
        out.append(pair)
        report.kept += 1
    return out
