"""The user-facing reward API.

A reward function is ``def reward(prompts, completions, **info) -> list[float]`` in the user's
own file or package, named in the config as ``path/to/file.py:reward`` or
``package.module:reward``. ``info`` carries per-sample extras (e.g. ``prompt_ids``,
``truncated``). Whatever the function does wrong -- wrong length, NaN/inf, a non-number, an
exception -- becomes a :class:`RewardError` naming the function and the offending sample.
This module knows nothing of trainers.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from pathlib import Path
from typing import Callable


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names it."""


def load_reward_fn(spec: str) -> Callable:
    """``file.py:name`` or ``package.module:name`` -> the callable."""
    if ":" not in spec:
        raise RewardError(f"reward '{spec}': expected 'path/to/file.py:function' or 'module:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py") or "/" in target or Path(target).is_file():
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"reward '{spec}': file '{path}' does not exist")
        mod_name = f"align_user_reward_{abs(hash(str(path.resolve())))}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module
        try:
            spec_.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"reward '{spec}': importing '{path}' failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"reward '{spec}': cannot import module '{target}': {e}") from e
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise RewardError(f"reward '{spec}': '{target}' has no function '{name}'")
    return fn


def fn_name(fn) -> str:
    mod = getattr(fn, "__module__", "?")
    try:
        where = f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (TypeError, OSError):
        where = mod
    return f"{getattr(fn, '__qualname__', repr(fn))} ({where})"


def call_reward(fn, prompts: list, completions: list[str], **info) -> list[float]:
    """Call a reward function and validate its answer."""
    try:
        out = fn(prompts, completions, **info)
    except Exception as e:
        raise RewardError(f"reward function {fn_name(fn)} raised {type(e).__name__}: {e} "
                          f"(batch of {len(completions)}; first completion: {completions[0][:80]!r})") from e
    if hasattr(out, "tolist"):  # numpy / torch
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward function {fn_name(fn)} returned {type(out).__name__}, "
                          f"expected a list of {len(completions)} floats")
    if len(out) != len(completions):
        raise RewardError(f"reward function {fn_name(fn)} returned {len(out)} values "
                          f"for {len(completions)} completions")
    values = []
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"reward function {fn_name(fn)}: sample {i} is {type(v).__name__} {v!r}, "
                              f"not a number (completion: {completions[i][:80]!r})")
        if not math.isfinite(v):
            raise RewardError(f"reward function {fn_name(fn)}: sample {i} is {v} "
                              f"(completion: {completions[i][:80]!r})")
        values.append(float(v))
    return values
