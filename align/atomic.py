"""Writes that a crash never leaves half done: a temp file or folder beside the target, then
one rename. Every job, checkpoint and export writes through these.

Two rules for what is beside the target: a temp or backup name is always fresh (``mkstemp`` /
``mkdtemp``), never a fixed ``<name>.old`` that could be a user's folder; and what is published
gets the modes the user's umask gives an ordinary file or folder (``mkstemp``/``mkdtemp`` make
them private, 0600/0700, which would otherwise stay).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

# What a full or locked disk answers a write with: no space (or no inodes: the same ENOSPC), a
# quota, a read-only file system.
DISK_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class DiskFull(OSError):
    """A write the disk refused; the message names what was being written, the folder, the free
    space and how to go on. Whatever was written before is left as it was."""


def disk_refusal(e: BaseException) -> int | None:
    """The errno of a disk refusal behind ``e`` (an OSError, or a writer's own error that carries
    the OS's text, as safetensors' "... (os error 28)"), else None."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in DISK_REFUSALS:
            return err.errno
        m = re.search(r"os error (\d+)", str(err or ""))
        if m and int(m.group(1)) in DISK_REFUSALS:
            return int(m.group(1))
    return None


def free_space(folder: Path) -> str:
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


@contextmanager
def disk_refusals(what: str, folder: Path, *, remove: Path | None = None, then: str = ""):
    """Turn a disk's refusal inside the block into one :class:`DiskFull` line; ``remove`` (a
    partial write of this call's own) is deleted first, so the last good state is what stays."""
    try:
        yield
    except BaseException as e:
        code = disk_refusal(e)
        if code is None or isinstance(e, DiskFull):
            raise
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True) if Path(remove).is_dir() else Path(remove).unlink(missing_ok=True)
        raise DiskFull(code, f"{what}: {os.strerror(code)} in '{folder}' ({free_space(folder)})"
                             + (f"; {then}" if then else "")) from e


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
    """Write via a temp file + rename, so a crash never leaves a half-written file (and a full
    disk leaves the previous version, said in one line)."""
    path = Path(path)
    with disk_refusals(f"writing {path.name}", path.parent, then=f"'{path}' is as it was"):
        _write_text(path, text)


def _write_text(path: Path, text: str) -> None:
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
    with disk_refusals(f"writing '{final}'", final.parent, then="nothing was published there (what was there before "
                                                                  "is unchanged)"):
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
