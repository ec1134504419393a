"""Writes that a crash never leaves half done: a temp file or folder beside the target, then
one rename. Every job, checkpoint and export writes through these.

Two rules for what is beside the target: a temp or backup name is always fresh (``mkstemp`` /
``mkdtemp``), never a fixed ``<name>.old`` that could be a user's folder; and what is published
gets the modes the user's umask gives an ordinary file or folder (``mkstemp``/``mkdtemp`` make
them private, 0600/0700, which would otherwise stay).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(folder: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give under the current umask."""
    return (0o777 if folder else 0o666) & ~_umask()


def follow_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it that mkstemp/mkdtemp made private)
    the modes an ordinary file or folder gets under the user's umask."""
    path = Path(path)
    if path.is_dir():
        os.chmod(path, public_mode(folder=True))
        for p in path.rglob("*"):
            if p.is_symlink():
                continue
            os.chmod(p, public_mode(folder=p.is_dir()))
    else:
        os.chmod(path, public_mode())


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_out_path(final: Path, flag: str = "--out") -> Path:
    """An output folder must have a name and must not be (or hold) the working folder: it is
    replaced by a rename, and the working folder cannot be."""
    final = Path(final)
    resolved = final.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or not resolved.name:
        raise ValueError(f"{flag} '{final}' is the current folder or one above it; name a new folder "
                         f"for the output, e.g. {flag} {final / 'out'}")
    return resolved if final.name in ("", ".", "..") else final


@contextmanager
def atomic_dir(final: Path):
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename."""
    final = check_out_path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        follow_umask(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, final: Path) -> None:
    """Put the fully written folder ``src`` at ``final``: an existing ``final`` is first moved
    into a fresh folder of its own (a name nobody else has) and deleted after, so at every moment
    one complete version is on disk and nothing but the old ``final`` is ever removed."""
    src, final = Path(src), Path(final)
    if not (final.exists() or final.is_symlink()):
        src.rename(final)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    final.rename(aside / final.name)
    src.rename(final)
    shutil.rmtree(aside, ignore_errors=True)
