"""Does a preference model transfer across HH-RLHF families? Reward models (`align rm`) and DPO
adapters (their implicit reward) trained on one helpful family, evaluated on the other, at
full length (no truncation), ties 1/2:

    helpful-rejection-sampled -> helpful-base    (runs/rm-hh, runs/dpo-hh: the shipped defaults)
    helpful-base -> helpful-rejection-sampled    (trained here: runs/rm-hb, runs/dpo-hb)

plus each model on held-out pairs of its own family where it has them. Missing runs are
trained first (one after another); evaluations go through `align eval`.

    python scripts/transfer.py --pairs 500 --train-pairs 600 --out results/transfer.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HRS, HB = "helpful-rejection-sampled", "helpful-base"
ALIGN = [sys.executable, "-m", "align.cli"]


def ensure(run: Path, job: str, overrides: list[str]) -> None:
    if (run / "summary.json").is_file():
        return
    subprocess.run([*ALIGN, job, *overrides, f"run.output_dir={run.parent}", f"run.name={run.name}", "run.save_every=0"],
                   check=True)


def evaluate(run: Path, subset: str, pairs: int, out: Path) -> dict:
    if not (out / "eval.json").is_file():
        subprocess.run([*ALIGN, "eval", str(run), "--data", "Anthropic/hh-rlhf", "--subsets", subset,
                        "--pairs", str(pairs), "--out", str(out)], check=True)
    table = json.loads((out / "eval.json").read_text())["preferences"]["table"]
    row = table[run.name]
    return {"accuracy": row.get("implicit_accuracy", row.get("pairwise_accuracy")),
            "reference_free_accuracy": row.get("reference_free_accuracy"),
            "base_reference_free_accuracy": table["base"]["reference_free_accuracy"],
            "pairs": json.loads((out / "eval.json").read_text())["preferences"]["pairs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--pairs", type=int, default=500, help="evaluation pairs per subset")
    ap.add_argument("--train-pairs", type=int, default=600, help="training pairs of the helpful-base models")
    ap.add_argument("--out", default="results/transfer.json")
    a = ap.parse_args()
    runs = Path(a.runs)
    hb_train = [f"data.train_subsets=[{HB}]", f"data.eval_subsets=[{HRS}]", "data.train_rows=all",
                f"data.max_train_pairs={a.train_pairs}", "evaluate=false"]
    ensure(runs / "rm-hb", "rm", [*hb_train, "data.validation_pairs=100"])
    ensure(runs / "dpo-hb", "dpo", hb_train)
    cells = {}
    for model, trained_on in (("rm-hh", HRS), ("dpo-hh", HRS), ("rm-hb", HB), ("dpo-hb", HB)):
        other = HB if trained_on == HRS else HRS
        cells[model] = {"trained_on": trained_on, "kind": "reward model" if model.startswith("rm") else "DPO implicit",
                        other: evaluate(runs / model, other, a.pairs, runs / "transfer" / f"{model}-on-{other}")}
    Path(a.out).write_text(json.dumps({"eval_pairs": a.pairs, "max_length": "untruncated", "cells": cells}, indent=2))
    plot(cells, Path(a.out).with_suffix(".png"))
    for m, c in cells.items():
        print(m, c)


def plot(cells: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(cells)
    accs = [next(v["accuracy"] for k, v in cells[n].items() if isinstance(v, dict)) for n in names]
    labels = [f"{n}\n{cells[n]['trained_on'].replace('helpful-', 'h-')} -> other" for n in names]
    ax.bar(labels, accs)
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylim(0.4, 0.75)
    ax.set_title("held-out pairwise accuracy on the OTHER helpful family (untruncated)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
