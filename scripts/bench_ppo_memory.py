"""Memory of each rank of `align ppo`: one process, two processes under DDP and two under FSDP2
(`accelerate launch` with configs/accelerate/ddp.yaml / fsdp.yaml, gloo on a CPU), for a tiny
model and SmolLM2-135M, side by side.

    python scripts/bench_ppo_memory.py            # writes results/ppo_memory_per_rank.{json,png}

Each run is a short GRPO job on the arithmetic task (hf engine, 2 iterations, 8 prompts x 4
answers, global batch the same for every arm); each rank reports (`summary.json` ->
`peak_memory_per_rank`) its peak resident memory and the weights it holds after sharding
(`parameters_gib`: under FSDP2 its shards of the decoder layers and embeddings, plus the
output head every rank keeps whole). The resident peak includes loading the whole base, which
every rank does before sharding: on a CPU it cannot show what sharding saves afterwards.
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


ARMS = (("single", 1), ("ddp", 2), ("fsdp2", 2))


def run(model: str, mode: str, processes: int, out: Path) -> dict:
    name = f"{mode}{processes}"
    args = ["ppo", "--config", "configs/smoke.yaml", f"model.name={model}", "model.dtype=float32",
            f"run.output_dir={out}", f"run.name={name}", "ppo.iterations=2", "ppo.prompts_per_iteration=8",
            "ppo.samples_per_prompt=4", "ppo.minibatch_size=32", "data.eval_prompts=0",
            "data.eval_dataset=arithmetic-heldout-100", "run.plot=false"]
    config = ROOT / "configs" / "accelerate" / ("fsdp.yaml" if mode == "fsdp2" else "ddp.yaml")
    launch = [sys.executable, "-m", "align.cli"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--mixed_precision", "no",
        "--num_processes", str(processes), "-m", "align.cli"]
    t0 = time.time()
    log = out / f"{name}.log"
    rc = subprocess.call([*launch, *args], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"{model} {mode} x {processes}: exit {rc}; see {log}:\n{log.read_text()[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    ran = json.loads((out / name / "run.json").read_text()).get("parallelism", "single")
    assert ran == mode, f"asked for {mode}, the run says {ran}"
    return {"parallelism": mode, "processes": processes, "wall_seconds": round(time.time() - t0, 1),
            "per_rank": summary["peak_memory_per_rank"]}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    colors = {"single": "#4c72b0", "ddp": "#dd8452", "fsdp2": "#55a868"}
    for ax, key, title in ((axes[0], "peak_rss_gib", "peak resident memory (GiB)"),
                           (axes[1], "parameters_gib", "weights held after sharding (GiB)")):
        labels, values, cs = [], [], []
        for model, runs in result["models"].items():
            for r in runs:
                for rank, m in enumerate(r["per_rank"]):
                    labels.append(f"{model}\n{r['parallelism']} r{rank}")
                    values.append(m.get(key, 0.0))
                    cs.append(colors[r["parallelism"]])
        ax.bar(range(len(values)), values, color=cs)
        ax.set_xticks(range(len(values)), labels, fontsize=6)
        ax.set_ylabel(title)
    fig.suptitle("align ppo per rank: 1 process, DDP x 2, FSDP2 x 2 (CPU, gloo)")
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
            "machine": platform.machine()}, "models": {}}
        for name, model in models.items():
            out = tmp / name
            out.mkdir()
            result["models"][name] = []
            for mode, n in ARMS:
                r = run(model, mode, n, out)
                result["models"][name].append(r)
                print(name, mode, n, r["per_rank"], f"{r['wall_seconds']} s", flush=True)
    for runs in result["models"].values():
        one = runs[0]["per_rank"][0]
        for r in runs[1:]:
            r["rank_peak_vs_one_process"] = round(max(m["peak_rss_gib"] for m in r["per_rank"]) / one["peak_rss_gib"], 3)
            r["rank_weights_vs_one_process"] = round(max(m["parameters_gib"] for m in r["per_rank"])
                                                     / one["parameters_gib"], 3)
    path = Path(a.out)
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
