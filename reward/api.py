"""The user-facing reward API.

A reward function is ``def reward(prompts, completions, **info) -> list[float]`` in the user's
own file or package, named in the config as ``path/to/file.py:reward`` or
``package.module:reward``. ``prompts`` are the last user turns as text; ``info`` carries
per-sample extras: ``messages`` (the prompt's whole message list: a multi-turn dialogue is seen
whole), ``truncated`` (cut at max_new_tokens), ``prompt_ids`` and ``completion_ids`` (tokens),
and every other field of the prompt's data row (``answer=``, ``solution=``...), one value per
completion. A function takes the extras it names, or all of them with ``**info``; ``def
reward(prompts, completions)`` works too. Arguments are passed by name where the function's
signature allows (TRL's convention: ``def accuracy_reward(completions, solution, **kwargs)``
runs unchanged), else ``prompts`` and ``completions`` by position.

``None`` for a sample means "no score here" (TRL's convention): it comes back as NaN, and the
trainer leaves that sample out of its group. Whatever else the function does wrong -- wrong
length, NaN/inf, a non-number, an exception -- becomes a :class:`RewardError` naming the
function and the offending sample. This module knows nothing of trainers.
"""
from __future__ import annotations

import contextlib


import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import threading
import time
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


class RewardCancelled(Exception):
    """The caller gave up waiting for the reward function (e.g. Ctrl-C during the call)."""


def _accepted(fn, info: dict) -> dict:
    """The extras ``fn`` takes: all with ``**info``, else those it names."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return info
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return info
    names = {p.name for p in params}
    return {k: v for k, v in info.items() if k in names}


def _takes_by_name(fn, info: dict) -> bool:
    """Whether ``fn(prompts=..., completions=..., **info)`` binds -- TRL calls its reward
    functions so, and ``def f(completions, solution, **kw)`` only works that way; a function
    whose first two parameters have other names gets them by position."""
    try:
        inspect.signature(fn).bind(prompts=None, completions=None, **dict.fromkeys(info))
        return True
    except (TypeError, ValueError):
        return False


def _call(fn, prompts, completions, info, timeout: float | None, cancelled):
    """``fn(prompts, completions, **info)`` in a worker thread, so that a function that hangs
    cannot hang the run: past ``timeout`` seconds, or once ``cancelled()`` is true, the caller
    stops waiting (the thread is left to finish on its own; it is a daemon).

    The function gets deep copies of everything: whatever it changes in place (a prompt's
    messages, say) stays its own and never reaches what the run stores. A ``SystemExit`` or
    ``KeyboardInterrupt`` it raises is its error, not an exit or the user's Ctrl-C (signals
    reach the main thread, never this one)."""
    import copy

    info = _accepted(fn, info)
    prompts, completions, info = copy.deepcopy((prompts, completions, info))
    result: dict = {}
    by_name = _takes_by_name(fn, info)

    def work():
        try:
            result["out"] = fn(prompts=prompts, completions=completions, **info) if by_name \
                else fn(prompts, completions, **info)
        except Exception as e:  # handed to the caller's thread below
            result["error"] = e
        except BaseException as e:  # SystemExit, KeyboardInterrupt, ... raised by the function
            result["error"] = RewardError(
                f"reward function {fn_name(fn)} raised {type(e).__name__}"
                f"{f': {e}' if str(e) else ''} (batch of {len(completions)}; first completion: "
                f"{str(completions[0])[:80]!r}); a reward must return its scores, not exit")

    worker = threading.Thread(target=work, name="align-reward", daemon=True)
    start = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
        if cancelled is not None and cancelled():
            raise RewardCancelled(f"reward function {fn_name(fn)} was still running")
        if timeout is not None and time.monotonic() - start > timeout:
            raise RewardError(f"reward function {fn_name(fn)} did not return within "
                              f"reward.timeout_seconds={timeout:g} s (batch of {len(completions)}); "
                              "is it waiting on something?")
    if "error" in result:
        raise result["error"]
    return result["out"]


@contextlib.contextmanager
def _process_state_kept(fn):
    """The training's random streams and torch's thread count as they were before a reward
    call: a reward that reseeds the global RNGs (``random.seed``, ``np.random.seed``,
    ``torch.manual_seed``) or sets torch's threads changes nothing outside itself. A working
    folder it changes is put back and said (paths are absolute anyway: runs.absolute_paths)."""
    import os
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_num_threads(), os.getcwd(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[5] is not None:
            torch.cuda.set_rng_state_all(states[5])
        if torch.get_num_threads() != states[3]:
            torch.set_num_threads(states[3])
        if os.getcwd() != states[4]:
            print(f"notice: reward function {fn_name(fn)} changed the working folder to {os.getcwd()}; "
                  f"put back to {states[4]}")
            os.chdir(states[4])


def call_reward(fn, prompts: list, completions: list, *, timeout: float | None = None,
                cancelled=None, **info) -> list[float]:
    """Call a reward function and validate its answer; a ``None`` sample comes back as NaN.
    ``timeout`` (seconds) and ``cancelled`` (a callable) bound how long the caller waits."""
    try:
        with _process_state_kept(fn):
            out = _call(fn, prompts, completions, info, timeout, cancelled)
    except (RewardError, RewardCancelled):
        raise
    except Exception as e:
        raise RewardError(f"reward function {fn_name(fn)} raised {type(e).__name__}: {e} "
                          f"(batch of {len(completions)}; first completion: {str(completions[0])[:80]!r})") from e
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
        if v is None:  # "no score for this sample"
            values.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"reward function {fn_name(fn)}: sample {i} is {type(v).__name__} {v!r}, "
                              f"not a number (completion: {str(completions[i])[:80]!r})")
        if not math.isfinite(v):
            raise RewardError(f"reward function {fn_name(fn)}: sample {i} is {v} "
                              f"(completion: {str(completions[i])[:80]!r})")
        values.append(float(v))
    return values
