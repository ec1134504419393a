"""Give freed heap memory back to the operating system between phases of a run.

PyTorch's CPU tensors come from glibc's malloc. Tensors under malloc's mmap threshold (which
grows to 32 MiB as large blocks are freed) live on the heap, and a heap fragmented by one
phase's activations stays resident after they are freed: measured on PPO (2-core CPU,
SmolLM2-135M, GAE with a separate critic), the update's leftovers were still resident when the
next generation started, and the process peaked at 2.37-2.42 GiB; trimmed at phase boundaries,
2.02-2.08. ``malloc_trim(0)`` there returns those pages (~0.1 s per PPO iteration). Trimming
inside a phase, or a fixed mmap threshold of 128 KiB-4 MiB, lowers the peak further but costs
5-45 % of the answers per second in page faults (measured), so neither is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def available_bytes(device) -> int | None:
    """Memory a new allocation on ``device`` can still take: the GPU's free memory, or the
    kernel's MemAvailable on a CPU; None where it cannot be read."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def full_finetuning_bytes(model) -> int:
    """What full fine-tuning adds to a loaded model: a frozen reference copy and the gradients
    (each the weights' size) and Adam's two fp32 moments."""
    n = sum(p.numel() for p in model.parameters())
    size = next(model.parameters()).element_size()
    return 2 * n * size + 2 * n * 4


def peak_memory(device) -> dict:
    """This process's peak so far: resident memory (the kernel's high-water mark, GiB) and, on a
    GPU, the most torch's allocator held (GiB) -- what one rank of a data-parallel run needs."""
    import resource

    import torch

    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # KiB on Linux
    if getattr(device, "type", str(device)) == "cuda":
        out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def held_parameters_gib(module) -> float:
    """GiB of weights this process holds: each parameter once, and of a sharded (FSDP2) one only
    this rank's shard -- what sharding saves, which the resident-memory peak (set when the whole
    base was loaded, before sharding) does not show."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return round(total / 2**30, 4)
