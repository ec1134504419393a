"""Peak memory of each rank of `align ppo`: one process against two data-parallel processes (DDP
through `accelerate launch`, gloo on a CPU), for a tiny model and SmolLM2-135M, side by side.

    python scripts/bench_ppo_memory.py            # writes results/ppo_memory_per_rank.{json,png}

Each run is a short GRPO job on the arithmetic task (hf engine, 2 iterations, 8 prompts x 4
answers, global batch the same for 1 and 2 processes); each rank reports its own peak resident
memory (`summary.json` -> `peak_memory_per_rank`). FSDP2 has no PPO path in align yet: the
comparison the issue asks for (DDP vs FSDP2) waits for it, and says so in the JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(model: str, processes: int, out: Path) -> dict:
    args = ["ppo", "--config", "configs/smoke.yaml", f"model.name={model}", "model.dtype=float32",
            f"run.output_dir={out}", f"run.name=p{processes}", "ppo.iterations=2", "ppo.prompts_per_iteration=8",
            "ppo.samples_per_prompt=4", "ppo.minibatch_size=32", "data.eval_prompts=0",
            "data.eval_dataset=arithmetic-heldout-100", "run.plot=false"]
    launch = [sys.executable, "-m", "align.cli"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
        "--num_processes", str(processes), "-m", "align.cli"]
    t0 = time.time()
    log = out / f"p{processes}.log"
    rc = subprocess.call([*launch, *args], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"{model} x {processes}: exit {rc}; see {log}:\n{log.read_text()[-2000:]}")
    summary = json.loads((out / f"p{processes}" / "summary.json").read_text())
    return {"processes": processes, "wall_seconds": round(time.time() - t0, 1),
            "per_rank": summary["peak_memory_per_rank"]}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    labels, values = [], []
    for model, runs in result["models"].items():
        for r in runs:
            for rank, m in enumerate(r["per_rank"]):
                labels.append(f"{model}\n{r['processes']} proc, rank {rank}")
                values.append(m["peak_rss_gib"])
    ax.bar(range(len(values)), values, color=["#4c72b0" if "1 proc" in l else "#dd8452" for l in labels])
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("peak resident memory (GiB)")
    ax.set_title("align ppo: peak memory per rank, 1 process vs DDP x 2 (CPU)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "ppo_memory_per_rank.json"))
    a = ap.parse_args(argv)
    from align.assets import DEFAULT_MODEL_ID
    from align.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="align-ppo-memory-") as tmp:
        tmp = Path(tmp)
        models = {"tiny": str(make_tiny_model(tmp / "tiny-model")), "SmolLM2-135M": DEFAULT_MODEL_ID}
        result = {"command": "python scripts/bench_ppo_memory.py", "machine": {
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None),
            "machine": platform.machine()}, "fsdp2": "not run: align ppo has no FSDP2 path yet (DDP only)",
            "models": {}}
        for name, model in models.items():
            out = tmp / name
            out.mkdir()
            result["models"][name] = [run(model, n, out) for n in (1, 2)]
            for r in result["models"][name]:
                print(name, r["processes"], [m["peak_rss_gib"] for m in r["per_rank"]], f"{r['wall_seconds']} s", flush=True)
    for runs in result["models"].values():
        one, two = runs
        two["rank_peak_vs_one_process"] = round(max(m["peak_rss_gib"] for m in two["per_rank"])
                                                / one["per_rank"][0]["peak_rss_gib"], 3)
    path = Path(a.out)
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
