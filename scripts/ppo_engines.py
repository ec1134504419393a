"""Does PPO learn the same with vLLM rollouts as with the `hf` engine? The PPO demo
(configs/ppo_imdb_sentiment.yaml) run with `rollout.engine` hf and vllm, same seeds, same
iterations; per-iteration training reward and the held-out reward / KL at the end, per engine,
mean and spread over seeds, in one JSON and one PNG.

The two engines sample with different random streams, so their curves differ by sampling noise
even when both serve the same policy; the question is whether the engine difference is larger
than the seed-to-seed spread. `z` compares each run's mean training reward over all iterations
(one number per run): (mean_vllm - mean_hf) / sqrt(sd_hf^2/n + sd_vllm^2/n). With a handful of
seeds this is a coarse check, not a proof; the curves are the evidence.

    python scripts/ppo_engines.py --seeds 0,1 --iterations 8 --out runs/ppo_engines.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ["hf", "vllm"]


def run_one(engine: str, seed: int, iterations: int, out_dir: Path, extra: list[str]) -> dict:
    name = f"{engine}-seed{seed}"
    folder = out_dir / name
    if not (folder / "summary.json").exists():  # finished runs are reused when re-plotting
        cmd = [sys.executable, "-m", "align.cli", "ppo", "--config", "configs/ppo_imdb_sentiment.yaml",
               f"rollout.engine={engine}", f"run.seed={seed}", f"ppo.iterations={iterations}",
               f"ppo.eval_every={iterations}", "ppo.time_budget_minutes=0", "run.save_every=0",
               f"run.output_dir={out_dir}", f"run.name={name}", *extra]
        t = time.time()
        log = out_dir / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
        print(f"{name}: {time.time() - t:.0f}s", flush=True)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval/reward_mean" in r]
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "engine": engine, "seed": seed,
        "train_reward": [r["reward_mean"] for r in train],
        "train_kl": [r["kl_per_answer"] for r in train],
        "eval_initial": evals[0]["eval/reward_mean"], "eval_final": evals[-1]["eval/reward_mean"],
        "eval_final_kl": evals[-1]["eval/kl_per_answer"],
        "parity_checks": sum(r.get("parity_checked") or 0 for r in train),
        # None for hf: the trainer is the engine, there is nothing to compare
        "max_engine_logprob_gap": max((r["engine_logprob_gap"] for r in train
                                       if r.get("engine_logprob_gap") is not None), default=None),
        "wall_seconds": summary.get("wall_seconds"),
    }


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def compare(runs: list[dict]) -> dict:
    by = {e: [r for r in runs if r["engine"] == e] for e in ENGINES}
    out = {}
    for e, rs in by.items():
        per_run = [statistics.fmean(r["train_reward"]) for r in rs]
        out[e] = {"mean_train_reward": mean_sd(per_run), "eval_final": mean_sd([r["eval_final"] for r in rs]),
                  "eval_final_kl": mean_sd([r["eval_final_kl"] for r in rs]),
                  "eval_gain": mean_sd([r["eval_final"] - r["eval_initial"] for r in rs])}
    (mh, sh), (mv, sv) = out["hf"]["mean_train_reward"], out["vllm"]["mean_train_reward"]
    n_h, n_v = len(by["hf"]), len(by["vllm"])
    se = (sh ** 2 / n_h + sv ** 2 / n_v) ** 0.5
    out["difference_vllm_minus_hf"] = mv - mh
    out["z"] = (mv - mh) / se if se > 0 else None
    out["within_noise"] = out["z"] is not None and abs(out["z"]) < 2
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"hf": "tab:blue", "vllm": "tab:orange"}
    for r in runs:
        it = range(1, len(r["train_reward"]) + 1)
        label = r["engine"] if r["seed"] == min(x["seed"] for x in runs) else None
        ax[0].plot(it, r["train_reward"], color=colors[r["engine"]], alpha=0.8, label=label)
        ax[1].plot(it, r["train_kl"], color=colors[r["engine"]], alpha=0.8, label=label)
    ax[0].set_ylabel("training reward (iteration mean)")
    ax[1].set_ylabel("KL to reference, nats per answer")
    for a in ax:
        a.set_xlabel("PPO iteration (one line per seed)")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--out", default="runs/ppo_engines.json")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    a = ap.parse_args()
    out = Path(a.out)
    run_dir = out.with_suffix("")
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = [run_one(e, s, a.iterations, run_dir, a.overrides) for s in seeds for e in ENGINES]
    report = {"config": "configs/ppo_imdb_sentiment.yaml", "iterations": a.iterations, "seeds": seeds,
              "overrides": a.overrides, "comparison": compare(runs), "runs": runs}
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"))
    print(json.dumps(report["comparison"], indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
