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


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, sizes=None, seconds: float = 0.5,
                       device: torch.device | str = "cpu") -> float:
    """What this process gets from square matrix products in ``dtype`` on ``device`` (the run's
    own: a GPU's peak for a GPU run, the CPU's with its torch threads for a CPU run): the best of
    ``sizes`` (a small product alone understates the peak, so "share of peak" could be inflated
    by a weak probe). The ceiling the phases' rates are compared with. Larger sizes are skipped
    once one product takes over 2 s (emulated bf16 runs ~1 GFLOP/s: a 4096 product would take
    minutes, and it would not change the verdict). Timed with the device synchronised."""
    from .placement import synchronize

    device = torch.device(device)
    if sizes is None:  # a GPU needs larger products to reach its peak
        sizes = (4096, 8192, 16384) if device.type == "cuda" else (1024, 2048, 4096)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        synchronize(device)
        t0 = time.perf_counter()
        a @ b  # warm-up
        synchronize(device)
        if time.perf_counter() - t0 > 2.0:
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
            break
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or reps < 2:
            a @ b
            reps += 1
            if device.type == "cuda" and reps % 8 == 0:
                synchronize(device)  # the clock reads finished work, not a queue of launches
        synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


_PEAKS: dict = {}


def device_peak_gflops(dtype: torch.dtype, device: torch.device) -> float:
    """:func:`matmul_peak_gflops` measured once per process for a (dtype, device)."""
    key = (dtype, str(device))
    if key not in _PEAKS:
        _PEAKS[key] = matmul_peak_gflops(dtype, device=device)
    return _PEAKS[key]


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
        weight = model.get_input_embeddings().weight
        self.dtype, self.device = weight.dtype, weight.device  # the frozen base's: the matmuls'
        self.phases: dict[str, list[float]] = {}

    def add(self, phase: str, seconds: float, gflop: float) -> None:
        entry = self.phases.setdefault(phase, [0.0, 0.0])
        entry[0] += seconds
        entry[1] += gflop

    @contextmanager
    def time(self, phase: str, tokens: int = 0, scored: int = 0, passes: float = 1.0):
        from .placement import synchronize

        synchronize(self.device)  # work queued before the phase is not the phase's
        t = time.perf_counter()
        yield
        synchronize(self.device)
        self.add(phase, time.perf_counter() - t, forward_gflop(self.counts, tokens, scored, passes))

    def report(self, peak_gflops: float | None = None) -> dict:
        peak = peak_gflops if peak_gflops is not None else device_peak_gflops(self.dtype, self.device)
        phases = {k: {"seconds": round(s, 1), "gflop": round(g, 1), "gflop_per_s": round(g / s, 1) if s > 0 else None,
                      "share_of_peak": round(g / s / peak, 3) if s > 0 and g > 0 else None}
                  for k, (s, g) in self.phases.items()}
        total_s = sum(s for s, _ in self.phases.values())
        total_g = sum(g for _, g in self.phases.values())
        return {"backbone_params": self.counts[0], "lm_head_params": self.counts[1], "phases": phases,
                "total_seconds": round(total_s, 1), "total_gflop": round(total_g, 1),
                "gflop_per_s": round(total_g / total_s, 1) if total_s else None,
                "matmul_peak_gflop_per_s": round(peak, 1), "peak_dtype": str(self.dtype).split(".")[-1],
                "peak_device": str(self.device),
                "share_of_peak": round(total_g / total_s / peak, 3) if total_s else None}
