"""float32 vs bf16 on this machine: the matmul peak of each dtype, and a LoRA training step
(forward + backward) and forward of the real base in each way a job can run it, side by side,
plus how far bf16 rounding moves the model's top-2 choice (the parity guard's near-tie margin).

    python scripts/bench_dtype.py            # -> results/bench_dtype.{json,png}
    python scripts/bench_dtype.py --batch 4 --length 192 --steps 5   # on a CPU with native bf16

The defaults (one row of 64 tokens) are sized for a CPU *without* native bf16, where a bf16
product runs ~1 GFLOP/s and a 4x192 step would take ~10 minutes.

What ``model.dtype: auto`` decides from the hardware (align.placement.auto_dtype) is what this
measures: bf16 pays only where the CPU computes it natively (avx512_bf16 / AMX). Each variant runs
in a process of its own (its peak RSS is its own), with the same inputs and thread count:

- ``float32``: base and LoRA in fp32 (what auto picks without native bf16);
- ``bf16_base``: the frozen base in bf16, LoRA weights and optimizer state in fp32 (PEFT casts
  the adapter up), log-probs in fp32 -- what align runs with model.dtype=bfloat16;
- ``fp32_autocast``: fp32 weights, matmuls under ``torch.autocast("cpu", bfloat16)``.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("float32", "bf16_base", "fp32_autocast")


def child(variant: str, batch: int, length: int, steps: int) -> dict:
    import contextlib

    import torch

    from align.assets import DEFAULT_MODEL_ID
    from align.compute import matmul_peak_gflops
    from align.config import LoraConfig, ModelConfig
    from align.scoring.logprobs import token_logprobs
    from align.models import add_policy_adapter, load_base

    base, _ = load_base(ModelConfig(name=DEFAULT_MODEL_ID, dtype="bfloat16" if variant == "bf16_base" else "float32"))
    model = add_policy_adapter(base, LoraConfig(r=8))
    lora_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, base.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "fp32_autocast" else contextlib.nullcontext()

    def step(train: bool) -> float:
        t = time.perf_counter()
        with autocast, (contextlib.nullcontext() if train else torch.no_grad()):
            logits = model(input_ids=ids).logits[:, :-1]
            logp, _ = token_logprobs(logits, ids[:, 1:])  # fp32 log-softmax, as every job does
            loss = -logp.mean()
        if train:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for _ in range(1):  # warm-up: oneDNN picks kernels on first use
        step(True)
    train = statistics.median(step(True) for _ in range(steps))
    forward = statistics.median(step(False) for _ in range(steps))
    return {"variant": variant, "train_step_seconds": round(train, 3), "forward_seconds": round(forward, 3),
            "lora_param_dtypes": lora_dtypes, "base_dtype": str(base.get_input_embeddings().weight.dtype),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "matmul_peak_gflop_per_s": {"float32": round(matmul_peak_gflops(torch.float32), 1),
                                        "bfloat16": round(matmul_peak_gflops(torch.bfloat16), 1)}
            if variant == "float32" else None, "threads": torch.get_num_threads()}


def tie_margin(prompts: int = 8, tokens: int = 16) -> dict:
    """How far bf16 rounding moves the trainer's choice between its two best next tokens: the
    fp32 model decodes greedily, and at every position the gap log p(top1) - log p(top2) (top-2
    by fp32) is computed by the fp32 model and by the same weights in bf16. The parity guard's
    bf16 near-tie margin (align/rollout/parity.py TIE_MARGIN) must exceed what this shows."""
    import copy

    import torch

    from align.assets import DEFAULT_MODEL_ID
    from align.chat import greedy_ids, prompt_ids
    from align.config import ModelConfig, PromptDataConfig
    from align.data.prompts import load_prompts
    from align.models import load_base

    fp32, tok = load_base(ModelConfig(name=DEFAULT_MODEL_ID, dtype="float32"))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    rows, _ = load_prompts(PromptDataConfig(dataset="Anthropic/hh-rlhf", subsets=["helpful-base"], eval_prompts=0))
    shifts = []
    with torch.no_grad():
        for row in rows[:prompts]:
            pid = prompt_ids(tok, row["messages"])[-64:]
            seq = torch.tensor([pid + greedy_ids(fp32, tok, pid, tokens)])
            a = fp32(input_ids=seq).logits[0, len(pid) - 1:-1].float().log_softmax(-1)
            b = bf16(input_ids=seq).logits[0, len(pid) - 1:-1].float().log_softmax(-1)
            top = a.topk(2, -1).indices
            gap32 = a.gather(-1, top[:, :1]) - a.gather(-1, top[:, 1:])
            gap16 = b.gather(-1, top[:, :1]) - b.gather(-1, top[:, 1:])
            shifts += (gap32 - gap16).abs().squeeze(-1).tolist()
    shifts.sort()
    return {"prompts": prompts, "positions": len(shifts), "max": round(shifts[-1], 4),
            "p99": round(shifts[int(0.99 * (len(shifts) - 1))], 4), "median": round(shifts[len(shifts) // 2], 4)}


def cpu_flags() -> dict:
    from align.placement import BF16_CPU_FEATURES, auto_dtype, cpu_bf16_feature

    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {"cpu": model, "machine": platform.machine(), "bf16_feature": cpu_bf16_feature(),
            "features_looked_for": list(BF16_CPU_FEATURES), "auto_dtype": auto_dtype("cpu")}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    peaks = runs[0]["matmul_peak_gflop_per_s"]
    axes[0].bar(list(peaks), list(peaks.values()), color=["C0", "C1"])
    axes[0].set(title="matmul peak (best of 1024/2048/4096)", ylabel="GFLOP/s")
    for ax, key, title in ((axes[1], "train_step_seconds", "LoRA train step"), (axes[2], "forward_seconds", "forward")):
        ax.bar([r["variant"] for r in runs], [r[key] for r in runs], color=["C0", "C1", "C2"])
        ax.set(title=f"{title} ({result['batch']}x{result['length']} tokens)", ylabel="seconds (median)")
    fig.suptitle(f"{result['machine']['cpu']}: bf16 feature {result['machine']['bf16_feature'] or 'none'}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_dtype"))
    ap.add_argument("--child", choices=VARIANTS + ("tie_margin",), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        got = tie_margin() if a.child == "tie_margin" else child(a.child, a.batch, a.length, a.steps)
        print("BENCH " + json.dumps(got), flush=True)
        return
    runs = []
    for v in VARIANTS + ("tie_margin",):  # one process each, one after another
        out = subprocess.run([sys.executable, __file__, "--child", v, "--batch", str(a.batch), "--length", str(a.length),
                              "--steps", str(a.steps)], capture_output=True, text=True, check=True)
        runs.append(json.loads(next(l for l in out.stdout.splitlines() if l.startswith("BENCH "))[6:]))
        print(runs[-1], flush=True)
    margin = runs.pop()
    fp32 = runs[0]
    for r in runs:
        r["train_step_vs_float32"] = round(r["train_step_seconds"] / fp32["train_step_seconds"], 3)
        r["forward_vs_float32"] = round(r["forward_seconds"] / fp32["forward_seconds"], 3)
        r["peak_rss_vs_float32"] = round(r["peak_rss_gib"] / fp32["peak_rss_gib"], 3)
    peaks = fp32["matmul_peak_gflop_per_s"]
    result = {"machine": cpu_flags(), "batch": a.batch, "length": a.length, "steps": a.steps, "variants": runs,
              "bf16_top2_gap_shift_nats": margin,
              "bf16_vs_float32_matmul_peak": round(peaks["bfloat16"] / peaks["float32"], 3),
              "command": "python scripts/bench_dtype.py"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(a.out + ".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=2))


if __name__ == "__main__":
    main()
