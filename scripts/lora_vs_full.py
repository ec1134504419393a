"""Does low-rank LoRA match full fine-tuning in RL here? The same PPO task (the IMDB sentiment
demo, critic-free RLOO advantages so every variant trains the policy alone) with LoRA r=1,
LoRA r=8 and full fine-tuning, same iterations, prompts and seeds; LoRA at 10x the full-FT
learning rate ("LoRA Without Regret"). Held-out reward curves in one PNG, finals in JSON.

Full fine-tuning needs a frozen reference copy of the weights -- exactly the cost align's LoRA
design avoids; it is `align ppo`'s ``lora.r: full`` mode (:class:`align.ppo.actor_critic.FullFineTuning`).
The study on the verifiable task, with learning-rate sweeps: scripts/lora_without_regret.py.

    python scripts/lora_vs_full.py --iterations 12 --out runs/lora_vs_full.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def child(variant: str, iterations: int, lr_full: float, out_dir: str) -> dict:
    from align.config import load_config
    from align.data.prompts import load_prompts
    from align.models import load_base
    from align.ppo.actor_critic import ActorCritic, FullFineTuning
    from align.rollout.hf import HFEngine
    from align.runs import RunDir
    from align.ppo.trainer import train_ppo

    lr = lr_full if variant == "full" else 10 * lr_full
    rank = {"lora_r1": 1, "lora_r8": 8}.get(variant, 8)
    cfg = load_config("ppo", "configs/ppo_imdb_sentiment.yaml", [
        "ppo.advantage=rloo", f"ppo.iterations={iterations}", f"ppo.learning_rate={lr}",
        "ppo.eval_every=3", f"lora.r={rank}", f"lora.alpha={2 * rank}",
        f"run.output_dir={out_dir}", f"run.name={variant}", "run.plot=false", "run.save_every=0"])
    torch.manual_seed(cfg.run.seed)
    train, held = load_prompts(cfg.data)
    base, tok = load_base(cfg.model)
    ac = FullFineTuning(base) if variant == "full" else ActorCritic(base, cfg.lora, with_critic=False)
    engine = HFEngine(ac.model, tok)
    run = RunDir(cfg.run, cfg, "ppo")
    summary = train_ppo(ac, engine, tok, train, held, cfg, run)
    curve = [(r["step"], r["eval/reward_mean"], r["eval/kl_per_answer"])
             for r in run.read_metrics() if "eval/reward_mean" in r]
    return {"variant": variant, "learning_rate": lr, "curve": curve,
            "final_reward": curve[-1][1], "final_kl": curve[-1][2],
            "gain_in_initial_std": summary.get("reward_gain_in_initial_std")}


def plot(results: dict, png: Path) -> None:
    """Reward and KL against iterations, and reward against KL: at equal steps a larger update
    wins reward, so the fair comparison is reward at matched KL (the third panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    for v, r in results.items():
        steps, rew, kl = zip(*r["curve"])
        ax[0].plot(steps, rew, marker="o", label=f"{v} (lr {r['learning_rate']:.0e})")
        ax[1].plot(steps, kl, marker="o", label=v)
        ax[2].plot(kl, rew, marker="o", label=v)
    ax[0].set_title("held-out reward")
    ax[1].set_title("KL per answer (nats)")
    ax[2].set_title("held-out reward vs KL")
    for x in ax[:2]:
        x.set_xlabel("iteration")
    ax[2].set_xlabel("KL per answer (nats)")
    for x in ax:
        x.grid(alpha=0.3)
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--lr-full", type=float, default=5e-5, help="full-FT LR; LoRA gets 10x")
    ap.add_argument("--variants", default="lora_r1,lora_r8,full")
    ap.add_argument("--out", default="runs/lora_vs_full.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    a = ap.parse_args()
    out = Path(a.out)
    if a.plot_only:
        plot(json.loads(out.read_text())["results"], out.with_suffix(".png"))
        return
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.iterations, a.lr_full, str(out.parent / "lora_vs_full_runs"))),
              flush=True)
        return
    results = {}
    for v in a.variants.split(","):
        print(f"== {v}", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", v, "--iterations", str(a.iterations),
                            "--lr-full", str(a.lr_full), "--out", str(out)], capture_output=True, text=True,
                           env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not lines:
            sys.exit(f"{v} failed:\n{p.stderr[-4000:]}")
        results[v] = json.loads(lines[-1][7:])
        print(f"   final held-out reward {results[v]['final_reward']:.3f}, KL {results[v]['final_kl']:.2f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"iterations": a.iterations, "lr_full": a.lr_full, "results": results}, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
