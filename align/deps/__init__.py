"""The doors to dependencies' private internals: everything align takes from TRL's and
transformers' non-public API goes through one module per dependency (:mod:`align.deps.trl_internals`,
:mod:`align.deps.transformers_internals`), each symbol listed in its ``PRIVATE`` table and pinned by a
test (tests/test_deps.py). An upgrade that moves one fails there -- and at a job's start,
through :func:`check` -- with a message naming the symbol, not deep inside a training step."""
from __future__ import annotations


class DependencyError(RuntimeError):
    """An installed TRL/transformers lacks a private symbol align relies on."""


def missing(private: dict) -> list[str]:
    """The entries of a ``PRIVATE`` table (name -> probe returning True when present) that fail."""
    out = []
    for name, probe in private.items():
        try:
            ok = probe()
        except Exception:  # an import or attribute error is what an incompatible release gives
            ok = False
        if not ok:
            out.append(name)
    return out


def check(package: str, private: dict, version: str) -> None:
    gone = missing(private)
    if gone:
        raise DependencyError(
            f"the installed {package} {version} lacks what align relies on: {', '.join(gone)}; "
            f"install the version in scripts/setup.sh (the known-good stack) or update align/deps/{package}_internals.py")
