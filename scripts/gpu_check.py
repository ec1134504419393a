"""Every align job once on this machine's device, as a user runs them, and what each measured.

    python scripts/gpu_check.py                      # on the visible CUDA GPU: tiny pass, then full size
    python scripts/gpu_check.py --random-weights     # a base in SmolLM2-135M's shape, random weights
    python scripts/gpu_check.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/gpu_check.py --device cpu --tiny  # the suite's form: tiny model, tiny data, ~1 min

The tiny pass runs dpo, rm, ppo with a verifier, ppo with a DPO-adapter reward and an RM judge,
eval (pairs, accuracy, generation), export (adapter and merged) and, where vLLM imports, serve's
dry run; the full pass (without ``--tiny``) the DPO default config and the smoke run. Each job is
its own ``align`` process (a crash is recorded, the rest go on), timed by the wall clock; its
summary gives the share of the device's peak (the compute meter measures the peak of the run's
own device and dtype) and accuracy where the weights are real. Writes ``--out`` (JSON), never
over a file it did not create in this call. Needs torch, transformers, PEFT, TRL, datasets,
accelerate (math-verify for the verifier); no vLLM, no network. A dependency whose version differs
from align's pins is said in the JSON, not fatal.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = {"torch": None, "transformers": "5.19.0", "trl": "1.16.0", "peft": "0.21.2", "datasets": "5.2.0",
        "accelerate": "1.15.0", "math-verify": "0.9.0", "vllm": None}
RANDOM_SHAPE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def dependencies() -> dict:
    """Each library's version (None = not installed) and whether it differs from align's pin."""
    from align.runs import library_versions

    return {name: {"version": version, "pinned": PINS[name], "skew": bool(PINS[name] and version and version != PINS[name])}
            for name, version in library_versions(PINS).items()}


def random_weights_model(folder: Path, like: str) -> str:
    """A causal LM in ``like``'s shape (its config and tokenizer, from the mirror) with random
    weights: enough to find crashes and measure speed, never accuracy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.assets import resolve_model
    from align.models import load_tokenizer

    config = AutoConfig.from_pretrained(resolve_model(like))
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    load_tokenizer(like).save_pretrained(folder)
    return str(folder)


TORCHRUN = "--torchrun"  # a plan entry starting so runs under torchrun, one process


def _align(args: list[str], log: Path, timeout: float, env: dict) -> dict:
    """One ``align`` command: ran or its error (the log's tail), and wall seconds."""
    t0 = time.time()
    launcher = [sys.executable, "-m", "align.cli"]
    if args[0] == TORCHRUN:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "align.cli"]
        args = args[1:]
    with open(log, "w") as f:
        try:
            proc = subprocess.run([*launcher, *args], stdout=f, stderr=subprocess.STDOUT,
                                  cwd=ROOT, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    out = {"command": "align " + " ".join(args), "wall_seconds": round(time.time() - t0, 1), "ran": rc == 0}
    if rc != 0:  # the error lines, not the engines' chatter
        lines = [l for l in log.read_text(errors="replace").splitlines() if " INFO " not in l and " WARNING " not in l]
        out["error"] = f"exit {rc}: " + "\n".join(lines[-15:])
    return out


def _summary(run: Path) -> dict:
    path = run / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _share(summary: dict, phase: str) -> float | None:
    phases = (summary.get("compute") or {}).get("phases") or {}
    return (phases.get(phase) or {}).get("share_of_peak")


def plan(model: str, runs: Path, work: Path, tiny: bool, device: str) -> list[tuple]:
    """(name, align arguments, the kind of result to read) for each check, in order."""
    common = [f"model.name={model}", f"model.device={device}", f"run.output_dir={runs}", "run.plot=false"]
    small_dpo = ["data.max_train_pairs=16", "data.max_eval_pairs=8", "train.batch_size=4", "train.max_length=96",
                 "train.max_prompt_length=48", "run.save_every=0"]
    small_ppo = [f"ppo.iterations={1 if tiny else 2}", "ppo.prompts_per_iteration=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8",
                 "rollout.max_new_tokens=8", "rollout.engine=hf", "ppo.eval_every=0"]
    checks = [
        ("dpo", ["dpo", *common, *small_dpo, "run.name=dpo"], "dpo"),
        ("rm", ["rm", *common, *small_dpo, "run.name=rm"], "rm"),
        ("ppo_verifier", ["ppo", "--config", "configs/smoke.yaml", *common, *small_ppo, "run.name=ppo-verifier",
                          "data.eval_dataset=arithmetic-heldout-100", "data.eval_prompts=8"], "ppo"),
        ("ppo_dpo_reward_rm_judge", ["ppo", *common, *small_ppo, "run.name=ppo-rlhf", "data.dataset=Anthropic/hh-rlhf",
                                     "data.subsets=[helpful-rejection-sampled]", "data.eval_subsets=[helpful-base]",
                                     "data.eval_prompts=4", "ppo.advantage=rloo", "reward.kind=dpo",
                                     f"reward.adapter={runs / 'dpo'}", "judge.kind=classifier",
                                     f"judge.adapter={runs / 'rm'}", "rollout.max_prompt_tokens=64"], "ppo"),
        # FSDP2 on one device (a group of one under torchrun): the sharded path, gathers and saves
        ("ppo_fsdp2_one_process", [TORCHRUN, "ppo", "--config", "configs/smoke.yaml", *common, *small_ppo,
                                   "run.name=ppo-fsdp2", "ppo.parallelism=fsdp2", "data.eval_dataset=arithmetic-heldout-100",
                                   "data.eval_prompts=8", "run.save_every=1"], "ppo"),
        ("eval_pairs", ["eval", str(runs / "dpo"), str(runs / "rm"), "--data", "Anthropic/hh-rlhf", "--subsets",
                        "helpful-base", "--pairs", "8", "--max-length", "96", "--device", device,
                        "--out", str(work / "eval-pairs")], "eval"),
        ("eval_accuracy", ["eval", str(runs / "ppo-verifier"), "--accuracy", "arithmetic-heldout-100",
                           "--max-new-tokens", "8", "--device", device, "--out", str(work / "eval-accuracy")],
         "eval"),
        ("eval_generation", ["eval", str(runs / "dpo"), "--generate", "--prompts", "Anthropic/hh-rlhf",
                             "--prompt-subsets", "helpful-base", "--num-prompts", "4", "--max-new-tokens", "8",
                             "--judge", f"classifier:{runs / 'rm'}", "--device", device,
                             "--out", str(work / "eval-generation")], "eval"),
        ("export_adapter", ["export", str(runs / "dpo"), "--out", str(work / "export-adapter"), "--device", device],
         "export"),
        # the suite's tiny form checks the merged export in vLLM once less (~25 s on a CPU)
        ("export_merged", ["export", str(runs / "dpo"), "--merge", "--out", str(work / "export-merged"),
                           "--device", device] + (["--no-vllm-check"] if tiny else []), "export"),
    ]
    try:
        import vllm  # noqa: F401

        checks.append(("serve_dry_run", ["serve", str(work / "export-adapter"), "--dry-run", "--port", "0"],
                       "serve"))
    except ImportError:
        pass
    if not tiny:
        checks += [
            ("dpo_default_full", ["dpo", f"model.name={model}", f"model.device={device}", f"run.output_dir={runs}",
                                  "run.name=dpo-full", "run.plot=false"], "dpo"),
            ("smoke_full", ["ppo", "--config", "configs/smoke.yaml", f"model.name={model}", f"model.device={device}",
                            f"run.output_dir={runs}", "run.name=smoke-full"], "ppo"),
        ]
    return checks


def read_result(kind: str, run: Path, real_weights: bool) -> dict:
    """What a finished job's summary says: seconds, share of peak, accuracy (real weights only)."""
    s = _summary(run)
    out = {}
    if kind == "dpo" and s:
        out["share_of_peak_train"] = _share(s, "train")
        out["share_of_peak_reference"] = _share(s, "reference_train")
        out["train_seconds"] = s.get("train_seconds")
        if real_weights and "eval" in s:
            out["implicit_accuracy"] = s["eval"]["implicit_accuracy"]
    if kind == "ppo" and s:
        iters = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
            if (run / "metrics.jsonl").is_file() else []
        out["train_seconds"] = s.get("train_seconds")
        out["share_of_peak"] = (s.get("compute") or {}).get("share_of_peak")
        out["parallelism"] = json.loads((run / "run.json").read_text()).get("parallelism")
        out["peak_memory_per_rank"] = s.get("peak_memory_per_rank")
        if real_weights and s.get("accuracy_change"):
            out["accuracy_change_lenient"] = s["accuracy_change"]["lenient"]
        gen = [r.get("gen_tokens_per_s") for r in iters if r.get("gen_tokens_per_s")]
        if gen:
            out["gen_tokens_per_s"] = gen[-1]
    if kind == "rm" and s and real_weights:
        out["pairwise_accuracy"] = (s.get("eval") or {}).get("pairwise_accuracy")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and the tiny pass only")
    ap.add_argument("--model", default=RANDOM_SHAPE, help="a Hub id (mirror), a folder or a .gguf file")
    ap.add_argument("--random-weights", action="store_true", help="random weights in --model's shape")
    ap.add_argument("--out", default=None, help="the JSON to write (default results/gpu_check_<device>.json)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one job may take")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU (use --device cpu --tiny for the CPU form)", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "results" / f"gpu_check_{args.device}.json")
    if out.exists() and not args.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = out.with_name(f"{out.stem}_{stamp}.json")  # never over a committed result
    work = Path(tempfile.mkdtemp(prefix="align-gpu-check-"))
    runs = work / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.time()
    try:
        if args.tiny:
            from align.tiny import make_tiny_model

            model, real = str(make_tiny_model(work / "tiny-model")), False
        elif args.random_weights:
            model, real = random_weights_model(work / "random-model", args.model), False
        else:
            model, real = args.model, True
        machine = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                   "torch": torch.__version__}
        result = {"machine": machine, "dependencies": dependencies(), "model": args.model if not args.tiny else "tiny",
                  "weights": "real" if real else "random", "jobs": {}}
        for name, cmd, kind in plan(model, runs, work, args.tiny, args.device):
            run_dir = runs / next((a.split("=", 1)[1] for a in cmd if a.startswith("run.name=")), name)
            print(f"[gpu_check] {name}: align {' '.join(cmd[:1])} ...", flush=True)
            job = _align(cmd, work / f"{name}.log", args.timeout, env)
            job.update(read_result(kind, run_dir, real))
            result["jobs"][name] = job
            print(f"[gpu_check] {name}: {'ran' if job['ran'] else 'FAILED'} in {job['wall_seconds']} s", flush=True)
        result["all_ran"] = all(j["ran"] for j in result["jobs"].values())
        result["wall_seconds"] = round(time.time() - t0, 1)
        from align.atomic import atomic_write_text

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")  # a fresh temp name, one rename
        print(f"[gpu_check] wrote {out}: {sum(j['ran'] for j in result['jobs'].values())} of "
              f"{len(result['jobs'])} jobs ran in {result['wall_seconds']} s")
        return 0 if result["all_ran"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
