"""Choose `align rm`'s recipe on a validation split of the TRAINING subset, never on the
evaluation subset: each variant trains on the same pairs of helpful-rejection-sampled (half-a)
and is scored on the same 200 held-out pairs of it. One process per variant, one after another.

    python scripts/rm_recipe.py --pairs 700 --out results/rm_recipe.json

Writes JSON (per variant: validation accuracy, margin, loss curve, seconds) and a PNG.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name -> overrides (on top of configs/rm_hh_rlhf.yaml)
    "lr5e-4": ["train.learning_rate=5e-4"],
    "lr1e-3": ["train.learning_rate=1e-3"],
    "lr2e-4": ["train.learning_rate=2e-4"],
    "lr1e-3_nocenter": ["train.learning_rate=1e-3", "train.center_coef=0"],
}


def run(name: str, overrides: list[str], pairs: int, out_dir: Path, length: tuple[int, int]) -> dict:
    args = [sys.executable, "-m", "align.cli", "rm", "--config", "configs/rm_hh_rlhf.yaml", *overrides,
            f"data.max_train_pairs={pairs}", "evaluate=false", f"train.max_length={length[0]}",
            f"train.max_prompt_length={length[1]}", f"run.output_dir={out_dir}", f"run.name={name}",
            "run.save_every=0", "run.plot=false"]
    t = time.time()
    subprocess.run(args, check=True)
    summary = json.loads((out_dir / name / "summary.json").read_text())
    losses = [json.loads(line).get("loss") for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    return {"overrides": overrides, "validation": summary["validation"], "train_pairs": summary["train_pairs"],
            "seconds": round(time.time() - t, 1), "loss": [x for x in losses if x is not None]}


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(results)
    a.bar(names, [results[n]["validation"]["pairwise_accuracy"] for n in names])
    a.axhline(0.5, color="grey", ls="--", lw=1)
    a.set_title("validation pairwise accuracy (200 held-out training pairs)")
    a.set_ylim(0.4, 0.75)
    for n in names:
        b.plot(results[n]["loss"], label=n)
    b.set_title("training loss per step")
    b.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=700, help="pairs sampled from half-a (200 of them validate)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--length", default="128,64", help="train.max_length,max_prompt_length")
    ap.add_argument("--out", default="results/rm_recipe.json")
    ap.add_argument("--runs", default="runs/rm_recipe")
    a = ap.parse_args()
    length = tuple(int(x) for x in a.length.split(","))
    results = {}
    for name in a.variants.split(","):
        results[name] = run(name, VARIANTS[name], a.pairs, Path(a.runs), length)
        print(name, results[name]["validation"], flush=True)
        Path(a.out).write_text(json.dumps({"pairs": a.pairs, "length": length, "variants": results}, indent=2))
    plot(results, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
