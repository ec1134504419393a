"""Benchmark DPO steps side by side, one process per variant (peak RSS is per process).

Variants (same real HH-RLHF pairs, same batch, same truncation, reference recomputed every
step so that where the reference comes from is what differs):

  trl_stock         TRL 1.16 DPOTrainer as shipped (its collator and fused LM head),
                    reference = the policy's adapter disabled
  packed_disabled   align's PackedDPOTrainer, reference = adapter disabled (align's default)
  packed_separate   align's PackedDPOTrainer, reference = a second, separately loaded model

Writes JSON (step times, peak RSS, ratios) and a PNG bar chart. Absolute seconds drift on
shared machines; compare the ratios from one run.

    python scripts/bench_dpo.py --out runs/bench_dpo.json --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["trl_stock", "packed_disabled", "packed_separate"]


def child(variant: str, steps: int, batch: int, max_length: int, max_prompt_length: int) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from align.config import load_config
    from align.data import load_preference_splits
    from align.models import add_policy_adapter, load_base
    from align.dpo.trainer import PackedDPOTrainer, dpo_args

    cfg = load_config("dpo", "configs/dpo_hh_rlhf.yaml", [
        f"data.max_train_pairs={batch * (steps + 1)}", "data.max_eval_pairs=0",
        f"train.batch_size={batch}", f"train.max_steps={steps + 1}", "train.warmup_ratio=0",
        f"train.max_length={max_length}", f"train.max_prompt_length={max_prompt_length}",
        "run.save_every=0"])  # a benchmark writes no checkpoints (the trainer would need a run folder)
    rows, _, _ = load_preference_splits(cfg.data)
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    base, tok = load_base(cfg.model)
    model = add_policy_adapter(base, cfg.lora)
    args = dpo_args(cfg, f"/tmp/bench_dpo_{variant}")
    args.disable_tqdm = True
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    if variant == "trl_stock":
        args.max_length = max_length
        args.truncation_mode = "keep_end"
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[StepTimer()])
    else:
        ref = load_base(cfg.model, with_tokenizer=False)[0] if variant == "packed_separate" else None
        trainer = PackedDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds,
                                   processing_class=tok, max_length=max_length,
                                   max_prompt_length=max_prompt_length, callbacks=[StepTimer()])
    trainer.train()
    timed = times[1:]  # the first step warms up allocators and kernels
    return {
        "variant": variant,
        "step_seconds": timed,
        "mean_step_seconds": sum(timed) / len(timed),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reference_is_separate_model": trainer.ref_model is not None,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_dpo.json")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (+1 warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.steps, a.batch, a.max_length, a.max_prompt_length)))
        return

    results = {}
    for variant in a.variants.split(","):
        print(f"== {variant}", flush=True)
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(a.steps),
               "--batch", str(a.batch), "--max-length", str(a.max_length),
               "--max-prompt-length", str(a.max_prompt_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(lines[-1][len("RESULT "):])
        r = results[variant]
        print(f"   {r['mean_step_seconds']:.1f} s/step, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)

    ratios = {}
    if {"trl_stock", "packed_disabled"} <= results.keys():
        ratios["step_time_trl_stock_over_packed"] = (
            results["trl_stock"]["mean_step_seconds"] / results["packed_disabled"]["mean_step_seconds"])
    if {"packed_separate", "packed_disabled"} <= results.keys():
        ratios["step_time_separate_over_disabled"] = (
            results["packed_separate"]["mean_step_seconds"] / results["packed_disabled"]["mean_step_seconds"])
        ratios["peak_rss_separate_over_disabled"] = (
            results["packed_separate"]["peak_rss_mib"] / results["packed_disabled"]["peak_rss_mib"])
    report = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "batch_pairs": a.batch,
              "max_length": a.max_length, "max_prompt_length": a.max_prompt_length,
              "timed_steps": a.steps, "results": results, "ratios": ratios,
              "machine": {"cpus": os.cpu_count()}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _plot(results, out.with_suffix(".png"))
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].bar(names, [results[n]["mean_step_seconds"] for n in names], color="tab:blue")
    axes[0].set_ylabel("seconds per DPO step")
    axes[1].bar(names, [results[n]["peak_rss_mib"] for n in names], color="tab:orange")
    axes[1].set_ylabel("peak RSS (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
