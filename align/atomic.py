"""Writes that a crash never leaves half done: a temp file or folder beside the target, then
one rename. Every job, checkpoint and export writes through these."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path):
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final, final.with_name(final.name + ".old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, final: Path, old: Path) -> None:
    """Put the fully written folder ``src`` at ``final``: an existing ``final`` is moved aside to
    ``old`` first and deleted after, so at every moment one complete version is on disk."""
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        src.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(final)
