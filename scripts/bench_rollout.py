"""Rollout throughput side by side: `hf` (transformers + PEFT), `vllm` + LoRA, `vllm` merged.

Same real prompts (IMDB review openings from ../shared, chat-formatted), same batch and lengths,
sampling at temperature 1 with a fixed seed, and an adapter with non-zero weights (as after
training). For each variant: generated tokens/s over `--rounds` rounds, and seconds per adapter
sync (the work after each policy update). One subprocess per variant (one vLLM engine each).

    python scripts/bench_rollout.py --batch 64 --tokens 64 --out runs/bench_rollout.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["hf", "vllm_lora", "vllm_merged"]


def child(variant: str, batch: int, tokens: int, rounds: int) -> dict:
    import torch

    from align.chat import prompt_ids
    from align.config import load_config
    from align.data.prompts import load_prompts
    from align.models import load_base
    from align.ppo import engine_options
    from align.ppo.actor_critic import ActorCritic
    from align.rollout import make_engine
    from align.rollout.base import SamplingConfig

    cfg = load_config("ppo", "configs/ppo_imdb_sentiment.yaml", [])
    train, _ = load_prompts(cfg.data)
    base, tok = load_base(cfg.model)
    ac = ActorCritic(base, cfg.lora, with_critic=False)
    torch.manual_seed(0)
    for n, w in ac.model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.01)  # a trained-looking adapter: sync moves real numbers
    ids = [prompt_ids(tok, p["messages"]) for p in train[:batch]]
    t0 = time.perf_counter()
    if variant == "hf":
        from align.rollout.hf import HFEngine

        engine = HFEngine(ac.model, tok, batch_size=batch)
    else:
        cfg.rollout.sync = "lora" if variant == "vllm_lora" else "merged"
        engine = make_engine("vllm", engine_options(cfg, None), ac.model, tok)
    startup = time.perf_counter() - t0
    params = SamplingConfig(max_new_tokens=tokens, temperature=1.0, seed=0)
    engine.generate(ids[:4], params)  # warm-up
    gen_tokens, gen_seconds, sync_seconds = 0, 0.0, []
    for r in range(rounds):
        t = time.perf_counter()
        engine.sync(ac.model, r + 1)
        sync_seconds.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = engine.generate(ids, params)
        gen_seconds += time.perf_counter() - t
        gen_tokens += sum(len(c.token_ids) for c in out)
    engine.close()
    return {"variant": variant, "tokens_per_s": gen_tokens / gen_seconds, "generated_tokens": gen_tokens,
            "generate_seconds": gen_seconds, "sync_seconds": sync_seconds,
            "mean_sync_seconds": sum(sync_seconds) / len(sync_seconds), "startup_seconds": startup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="runs/bench_rollout.json")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.batch, a.tokens, a.rounds)), flush=True)
        return
    results = {}
    for v in a.variants.split(","):
        print(f"== {v}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", v, "--batch", str(a.batch),
                               "--tokens", str(a.tokens), "--rounds", str(a.rounds)],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:  # recorded, not fatal: the other variants still compare
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results[v] = {"variant": v, "error": err}
            print(f"   failed (exit {proc.returncode}): {err}", flush=True)
            continue
        results[v] = json.loads(lines[-1][7:])
        print(f"   {results[v]['tokens_per_s']:.1f} tok/s, sync {results[v]['mean_sync_seconds']:.3f} s", flush=True)
    ok = {v: r for v, r in results.items() if "error" not in r}
    ratios = {f"{v}_over_hf": ok[v]["tokens_per_s"] / ok["hf"]["tokens_per_s"]
              for v in ok if v != "hf" and "hf" in ok}
    report = {"batch": a.batch, "max_new_tokens": a.tokens, "rounds": a.rounds, "results": results,
              "throughput_ratios": ratios}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = ok
    names = list(results)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].bar(names, [results[n]["tokens_per_s"] for n in names])
    ax[0].set_ylabel(f"generated tokens/s (batch {a.batch} x {a.tokens})")
    ax[1].bar(names, [results[n]["mean_sync_seconds"] for n in names], color="tab:orange")
    ax[1].set_ylabel("seconds per adapter sync")
    for x in ax:
        x.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
