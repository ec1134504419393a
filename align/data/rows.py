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


def iter_jsonl(path: Path, report: LoadReport, strict: bool = False):
    """Yield ``(where, row)`` per JSON line; malformed lines are counted (or raise under strict).
    A file that ends early (a cut download, a truncated ``.gz``) is always an error naming the
    file and its last good line: silently training on part of a file is worse than stopping.
    Lines are read as bytes and decoded one by one, so a byte that is not UTF-8 is named by its
    line and offset (a decoder's own position is relative to a chunk, not the file)."""
    lineno, offset = 0, 0
    try:
        with (gzip.open(path, "rb") if Path(path).suffix == ".gz" else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is not JSON
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start} of "
                                    f"the line ({offset + e.start} of the file{' uncompressed' if Path(path).suffix == '.gz' else ''}); "
                                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
                offset += len(raw)
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    report.skip(where, f"malformed JSON: {e.msg} at column {e.colno}", strict)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
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
