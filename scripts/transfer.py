"""Does a preference model transfer across HH-RLHF families? Reward models (`align rm`) and DPO
adapters (their implicit reward) trained on one helpful family, each evaluated on pairs it
never trained on of BOTH families, at full length (no truncation), ties 1/2:

    rm-hh, dpo-hh   helpful-rejection-sampled (rm: half-a, dpo: half-b; the shipped defaults)
    rm-hb, dpo-hb   helpful-base half-a (--train-pairs of them)

    on helpful-base half-b              all four (hh: the other family; hb: their own, held out)
    on helpful-rejection-sampled half-b rm-hb, dpo-hb (the other family), rm-hh (its own, held out)
    on helpful-rejection-sampled half-a dpo-hh (its own, held out)

Missing runs are trained first (one after another); evaluations go through `align eval`, one
per data set, so the base's reference pass is shared by the models scored on the same pairs.

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
FAMILY = {"rm-hh": HRS, "dpo-hh": HRS, "rm-hb": HB, "dpo-hb": HB}
# (subset, half of its rows, models evaluated there): every model only on rows it never saw
EVALS = [(HB, "half-b", ["rm-hh", "dpo-hh", "rm-hb", "dpo-hb"]),
         (HRS, "half-b", ["rm-hb", "dpo-hb", "rm-hh"]),
         (HRS, "half-a", ["dpo-hh"])]


def ensure(run: Path, job: str, overrides: list[str]) -> None:
    if (run / "summary.json").is_file():
        return
    subprocess.run([*ALIGN, job, *overrides, f"run.output_dir={run.parent}", f"run.name={run.name}",
                    "run.save_every=0", "evaluate=false"], check=True)


def evaluate(runs: Path, models: list[str], subset: str, rows: str, pairs: int, out: Path) -> dict:
    if not (out / "eval.json").is_file():
        subprocess.run([*ALIGN, "eval", *(str(runs / m) for m in models), "--data", "Anthropic/hh-rlhf",
                        "--subsets", subset, "--rows", rows, "--pairs", str(pairs), "--out", str(out)], check=True)
    prefs = json.loads((out / "eval.json").read_text())["preferences"]
    table = prefs["table"]
    return {m: {"accuracy": table[m].get("implicit_accuracy", table[m].get("pairwise_accuracy")),
                "reference_free_accuracy": table[m].get("reference_free_accuracy"),
                "base_reference_free_accuracy": table["base"]["reference_free_accuracy"],
                "pairs": prefs["pairs"], "rows": f"{subset} {rows}", "seconds": prefs["seconds"]} for m in models}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--pairs", type=int, default=500, help="evaluation pairs per data set")
    ap.add_argument("--train-pairs", type=int, default=600, help="training pairs of the helpful-base models")
    ap.add_argument("--out", default="results/transfer.json")
    a = ap.parse_args()
    runs = Path(a.runs)
    hb_train = [f"data.train_subsets=[{HB}]", "data.train_rows=half-a", f"data.eval_subsets=[{HRS}]",
                f"data.max_train_pairs={a.train_pairs}"]
    ensure(runs / "rm-hh", "rm", [])
    ensure(runs / "dpo-hh", "dpo", [])
    ensure(runs / "rm-hb", "rm", [*hb_train, "data.validation_pairs=100"])
    ensure(runs / "dpo-hb", "dpo", hb_train)
    cells = {m: {"trained_on": fam, "kind": "reward model" if m.startswith("rm") else "DPO implicit"}
             for m, fam in FAMILY.items()}
    for subset, rows, models in EVALS:
        got = evaluate(runs, models, subset, rows, a.pairs, runs / "transfer" / f"{subset}-{rows}")
        for m, v in got.items():
            cells[m]["own family" if subset == FAMILY[m] else "other family"] = v
    Path(a.out).write_text(json.dumps({"eval_pairs": a.pairs, "max_length": "untruncated", "cells": cells}, indent=2))
    plot(cells, Path(a.out).with_suffix(".png"))
    for m, c in cells.items():
        print(m, c["trained_on"], {k: round(c[k]["accuracy"], 3) for k in ("own family", "other family")})


def plot(cells: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    names = list(cells)
    for j, (col, colour) in enumerate((("own family", "tab:blue"), ("other family", "tab:orange"))):
        accs = [cells[n][col]["accuracy"] for n in names]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
        ax.bar(xs, accs, width=0.38, color=colour, label=f"{col} (held-out rows)")
        for x, v in zip(xs, accs):
            ax.text(x, v + 0.005, f"{v:.3f}", ha="center", fontsize=8)
    short = {HRS: "h-rejection-sampled", HB: "h-base"}
    ax.set_xticks(range(len(names)), [f"{n}\non {short[cells[n]['trained_on']]}" for n in names], fontsize=8)
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylim(0.4, 0.75)
    ax.set_ylabel("pairwise accuracy (ties 1/2)")
    ax.set_title("preference models on held-out HH pairs, own vs other helpful family (untruncated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
