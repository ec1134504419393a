"""Peak RSS of `align ppo` with its reward model as an adapter on the policy's base against the
same run with a Python-function reward (no model at all): what the reward role costs in memory.
Each in its own process, 2 iterations of configs/ppo_hh_rlhf.yaml.

    python scripts/reward_memory.py --reward-adapter runs/rm-hh --out results/reward_memory.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(kind: str, adapter: str, out: str) -> None:
    from align.config import load_config
    from align.models import live_copies
    from align.ppo import run_ppo

    reward = ["reward.kind=classifier", f"reward.adapter={adapter}"] if kind == "classifier" else \
        ["reward.kind=function", "reward.function=reward.examples:length_target"]
    cfg = load_config("ppo", ROOT / "configs/ppo_hh_rlhf.yaml", [
        *reward, "judge.kind=none", "ppo.iterations=2", "ppo.eval_every=0", "data.eval_prompts=8",
        "ppo.time_budget_minutes=0", "run.save_every=0", "run.plot=false", f"run.output_dir={out}", f"run.name={kind}"])
    import align.ppo.trainer as trainer

    seen = {}
    real_init = trainer.PPOLoop.__init__

    def init(self, ac, *a, **k):  # count base copies once every role is loaded
        real_init(self, ac, *a, **k)
        seen["base_copies"] = live_copies(ac.model.get_input_embeddings().weight)  # the whole process

    trainer.PPOLoop.__init__ = init
    summary = run_ppo(cfg)
    print("MEM_RESULT " + json.dumps({"kind": kind, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                      "base_copies": seen["base_copies"], "iterations": summary["iterations"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reward-adapter", required=True)
    ap.add_argument("--out", default="results/reward_memory.json")
    ap.add_argument("--runs", default="runs/reward_memory")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.reward_adapter, a.runs)
    results = {}
    for kind in ("function", "classifier"):
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--reward-adapter", a.reward_adapter,
                               "--runs", a.runs], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("MEM_RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
        results[kind] = json.loads(line[-1][len("MEM_RESULT "):])
        print(results[kind], flush=True)
    results["ratio_classifier_vs_function"] = round(results["classifier"]["peak_rss_gib"] / results["function"]["peak_rss_gib"], 3)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(results["ratio_classifier_vs_function"])


if __name__ == "__main__":
    main()
