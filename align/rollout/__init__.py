"""Rollout engines. Only this package imports vLLM, and only when that engine is chosen, so
everything else runs and tests where vLLM is absent or slow to start."""
from __future__ import annotations

import importlib.util


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None
