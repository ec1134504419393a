"""Rollout engines: one interface (:class:`~align.rollout.base.RolloutEngine`), chosen by name.

Only this package imports vLLM, and only when that engine is chosen, so everything else runs
and tests where vLLM is absent or slow to start. Adding an engine is one module with a
``RolloutEngine`` subclass plus one line in :data:`ENGINES`.
"""
from __future__ import annotations

import importlib
import importlib.util

# name -> "module:class", imported only when chosen
ENGINES = {
    "hf": "align.rollout.hf:HFEngine",
    "vllm": "align.rollout.vllm_engine:VLLMEngine",
    "vllm-server": "align.rollout.vllm_server:VLLMServerEngine",
}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_class(name: str):
    if name not in ENGINES:  # the config already refuses such a name (rollout.engine)
        raise ValueError(f"unknown rollout engine {name!r} (known: {', '.join(ENGINES)})")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(name: str, opts, peft_model, tokenizer):
    """Build engine ``name`` (see :data:`ENGINES`) serving ``peft_model``'s current policy."""
    return engine_class(name).build(opts, peft_model, tokenizer)
