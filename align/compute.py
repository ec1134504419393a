"""Model FLOPs per phase of a job and the rate reached, to compare with what this machine can do.

Forward FLOPs per token: 2 x the backbone's weights (every token a row holds) plus 2 x the LM
head's (only where a token is scored); attention scores are left out (a few % at these
lengths). A training step costs about 2 forwards: the backward computes activation gradients
through a frozen base (LoRA's weight gradients are a few % of that).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def flop_counts(model) -> tuple[int, int]:
    """(backbone weights, LM head weights) of a causal LM (PEFT-wrapped or not); LoRA and the
    embedding lookup are not counted."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings().weight.numel()
    backbone = sum(p.numel() for n, p in base.named_parameters()
                   if "lora_" not in n and "embed" not in n and "lm_head" not in n)
    return backbone, head


def forward_gflop(model_counts: tuple[int, int], tokens: int, scored: int, passes: float = 1.0) -> float:
    backbone, head = model_counts
    return passes * (2 * backbone * tokens + 2 * head * scored) / 1e9


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, sizes=(1024, 2048, 4096), seconds: float = 0.5) -> float:
    """What this process gets from square matrix products in ``dtype`` with its torch threads:
    the best of ``sizes`` (a small product alone understates the peak, so "share of peak"
    could be inflated by a weak probe). The ceiling the phases' rates are compared with. Larger
    sizes are skipped once one product takes over 2 s (emulated bf16 runs ~1 GFLOP/s: a 4096
    product would take minutes, and it would not change the verdict)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        a @ b  # warm-up
        if time.perf_counter() - t0 > 2.0:
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
            break
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or reps < 2:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


class NullMeter:
    """Counts nothing (callers that keep no account)."""

    counts = (0, 0)

    @contextmanager
    def time(self, phase: str, tokens: int = 0, scored: int = 0, passes: float = 1.0):
        yield

    def add(self, phase: str, seconds: float, gflop: float) -> None:
        pass


class ComputeMeter:
    """Seconds and model GFLOP per named phase, summed over a run."""

    def __init__(self, model):
        self.counts = flop_counts(model)
        self.dtype = model.get_input_embeddings().weight.dtype  # the frozen base's: the matmuls'
        self.phases: dict[str, list[float]] = {}

    def add(self, phase: str, seconds: float, gflop: float) -> None:
        entry = self.phases.setdefault(phase, [0.0, 0.0])
        entry[0] += seconds
        entry[1] += gflop

    @contextmanager
    def time(self, phase: str, tokens: int = 0, scored: int = 0, passes: float = 1.0):
        t = time.perf_counter()
        yield
        self.add(phase, time.perf_counter() - t, forward_gflop(self.counts, tokens, scored, passes))

    def report(self, peak_gflops: float | None = None) -> dict:
        peak = peak_gflops if peak_gflops is not None else matmul_peak_gflops(self.dtype)
        phases = {k: {"seconds": round(s, 1), "gflop": round(g, 1), "gflop_per_s": round(g / s, 1) if s > 0 else None,
                      "share_of_peak": round(g / s / peak, 3) if s > 0 and g > 0 else None}
                  for k, (s, g) in self.phases.items()}
        total_s = sum(s for s, _ in self.phases.values())
        total_g = sum(g for _, g in self.phases.values())
        return {"backbone_params": self.counts[0], "lm_head_params": self.counts[1], "phases": phases,
                "total_seconds": round(total_s, 1), "total_gflop": round(total_g, 1),
                "gflop_per_s": round(total_g / total_s, 1) if total_s else None,
                "matmul_peak_gflop_per_s": round(peak, 1), "peak_dtype": str(self.dtype).split(".")[-1],
                "share_of_peak": round(total_g / total_s / peak, 3) if total_s else None}
