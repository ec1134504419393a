""""LoRA Without Regret"'s claims, measured on align's verifiable arithmetic task.

One command runs every arm as a normal `align ppo` run folder under ``--runs``, evaluates the
base once, and writes ``--out`` (JSON) and its PNG and table from whatever has finished. Each
finished arm also leaves a small record in ``--records`` (committed with the results: its curve,
sizes, machine and its 1,000 per-problem final answers, which the paired CIs need), so the
study goes on across sessions and machines although run folders are not kept: an arm with a
record is never run again.

    python scripts/lora_without_regret.py                       # everything, resumable
    python scripts/lora_without_regret.py --only rank_lr        # one experiment
    python scripts/lora_without_regret.py --report-only         # JSON + PNG from finished runs

Written down before any run (the study's protocol; changes after seeing results are said so in
docs/lora-without-regret.md):

- Task: configs/grpo_arithmetic.yaml's GRPO settings (8 prompts x 8 answers per iteration, 2
  optimizer steps of 32 answers, k3 KL loss at 0.02, 20 new tokens, temperature 1) with the hf
  rollout engine for every arm (full fine-tuning has no vLLM sync), ``ITERATIONS`` iterations
  per run, seed 0.
- Yardstick: greedy accuracy on ``arithmetic-heldout-1000`` (1,000 fixed problems, none trained
  on), graded lenient (the answer's last number: the training reward's grader) and strict; the
  base once, then every ``EVAL_EVERY`` iterations (4 points per run); evaluation off the clock.
  Differences between arms are paired on the same 1,000 problems (95 % CI). KL to the base: the
  training samples' mean KL per answer over the iterations before each evaluation.
- LoRA: alpha fixed at ``ALPHA`` for every rank (the update scaled by alpha / r, the paper's
  1/r parametrisation); learning rates ``LORA_LRS`` (LoRA) and ``FULL_LRS`` (full fine-tuning,
  10x lower), extended by one more where the best sits at an edge.
- "Matches" means the paired 95 % CI of the difference lies inside +-``MARGIN`` points (lenient);
  "differs" means it lies outside 0; anything else is inconclusive at this scale.
- The best learning rate of an arm is picked on this held-out set's final accuracy (the
  paper's curves do the same); the second-seed repeats of the best points are the unselected
  check of those picks.

Added after the first 8 runs (said in docs/lora-without-regret.md): ``model.dtype=float32`` is
pinned (``auto`` picks bf16 on a CPU with native bf16, and the study began in float32); and a
record made before records kept per-problem answers (the first 8, whose run folders were lost
with their session's machine) counts for its grid, but when it is a rank's best -- so a claim's
paired CI needs its answers -- that arm is run again and the new run replaces it (the first
run's figures kept beside it as ``earlier``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "grpo_arithmetic.yaml"
HELDOUT = "arithmetic-heldout-1000"
ITERATIONS, EVAL_EVERY = 12, 4
ALPHA = 32
LORA_LRS = (1e-4, 3e-4, 1e-3)
FULL_LRS = (1e-5, 3e-5, 1e-4)
RANKS = ("1", "8", "64", "full")
MARGIN = 0.04
# Where the adapter goes, at about r=8 all-linear's trainable parameters (SmolLM2-135M: per
# layer, attention 3,840 r and MLP 6,336 r; all-linear 10,176 r): attention-only r=21, MLP-only r=13.
PLACEMENT = {"attention": (21, ["q_proj", "k_proj", "v_proj", "o_proj"]), "mlp": (13, ["gate_proj", "up_proj", "down_proj"])}
BIG_BATCH = 4  # x the prompts per iteration and the answers per optimizer step; the same number of steps


def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _rank_overrides(rank: str) -> list[str]:
    return ["lora.r=full"] if rank == "full" else [f"lora.r={rank}", f"lora.alpha={ALPHA}"]


def common(a) -> list[str]:
    out = ["model.dtype=float32", "rollout.engine=hf", f"data.eval_dataset={a.heldout}", "data.eval_prompts=0", f"ppo.iterations={a.iterations}",
           f"ppo.eval_every={a.eval_every}", "ppo.eval_sampled=false", "ppo.eval_at_start=false", "ppo.eval_pass_k=0",
           "ppo.time_budget_minutes=0", "run.save_every=0", "run.plot=false"]
    return out + [f"model.name={a.model}"] * bool(a.model) + list(a.set)


def rank_lr_arms(a) -> dict[str, dict]:
    """Experiment 1: every rank at every learning rate of its grid (+ an edge extension), in the
    order they run: every rank's middle rate first, so a partial study already compares ranks."""
    grids = {}
    for rank in a.ranks:
        grid = list(a.full_lrs if rank == "full" else a.lora_lrs)
        done = {lr: final_lenient(a, f"r{rank}-lr{_lr_tag(lr)}") for lr in grid}
        if all(v is not None for v in done.values()) and len(grid) > 1:  # extend past an edge once
            best = max(done, key=done.get)
            if best in (grid[0], grid[-1]):
                step = grid[1] / grid[0]
                grid.append(float(f"{best * step if best == grid[-1] else best / step:.0e}"))
        # an extension that ran stays in its grid, even where a later re-run moves the best off the edge
        grid += [lr for lr in (float(p.stem.split("-lr", 1)[1]) for p in Path(a.records).glob(f"r{rank}-lr*.json"))
                 if lr not in grid]
        middle = len(grid[:3]) // 2
        grids[rank] = [grid[middle]] + [lr for i, lr in enumerate(grid) if i != middle]
    arms = {}
    for i in range(max(map(len, grids.values()), default=0)):
        for rank, grid in grids.items():
            if i < len(grid):
                lr = grid[i]
                arms[f"r{rank}-lr{_lr_tag(lr)}"] = {"experiment": "rank_lr", "rank": rank, "lr": lr, "seed": 0,
                                                    "overrides": _rank_overrides(rank) + [f"ppo.learning_rate={lr}"]}
    return arms


def best_names(a) -> dict[str, str | None]:
    """Each rank's best finished experiment-1 run (final lenient accuracy), once all its grid has run."""
    grid = rank_lr_arms(a)
    best = {}
    for rank in a.ranks:
        scores = {n: final_lenient(a, n) for n, v in grid.items() if v["rank"] == rank}
        best[rank] = max(scores, key=scores.get) if scores and None not in scores.values() else None
    return best


def best_lr(a, rank: str) -> float | None:
    """The learning rate of ``rank``'s best experiment-1 run (None until its grid has run)."""
    name = best_names(a).get(rank)
    return rank_lr_arms(a)[name]["lr"] if name else None


def later_arms(a) -> dict[str, dict]:
    """Experiments that start from experiment 1's best learning rates: a second seed, where the
    adapter goes, and the batch size. An arm whose learning rate is not known yet waits."""
    arms = {}
    for rank in [r for r in ("1", "8", "full") if r in a.ranks]:
        lr = best_lr(a, rank)
        arms[f"r{rank}-best-seed1"] = {"experiment": "seed", "rank": rank, "lr": lr, "seed": 1,
                                       "overrides": _rank_overrides(rank) + [f"ppo.learning_rate={lr}", "run.seed=1"]}
    lr8 = best_lr(a, "8") if "8" in a.ranks else None
    for where, (r, modules) in PLACEMENT.items():
        arms[f"{where}-r{r}"] = {"experiment": "placement", "rank": str(r), "lr": lr8, "seed": 0, "modules": where,
                                 "overrides": [f"lora.r={r}", f"lora.alpha={ALPHA}", f"lora.target_modules=[{','.join(modules)}]",
                                               f"ppo.learning_rate={lr8}"]}
    from align.config import load_config

    ppo = load_config("ppo", str(a.config), common(a)).ppo
    big = [f"ppo.prompts_per_iteration={BIG_BATCH * ppo.prompts_per_iteration}",
           f"ppo.minibatch_size={BIG_BATCH * ppo.minibatch_size}"]
    for rank in [r for r in ("8", "full") if r in a.ranks]:
        lr = best_lr(a, rank)
        arms[f"r{rank}-batch{BIG_BATCH}x"] = {"experiment": "batch", "rank": rank, "lr": lr, "seed": 0,
                                              "overrides": _rank_overrides(rank) + [f"ppo.learning_rate={lr}", *big]}
    return arms


def all_arms(a) -> dict[str, dict]:
    return {**rank_lr_arms(a), **later_arms(a)}


# -- running ---------------------------------------------------------------------------------
def run_folder(a, name: str) -> Path:
    return Path(a.runs) / name


def record_path(a, name: str) -> Path:
    return Path(a.records) / f"{name}.json"


def read_record(a, name: str) -> dict | None:
    """The arm's record; made from its run folder where that finished but has no record yet."""
    f = record_path(a, name)
    if f.is_file():
        return json.loads(f.read_text())
    if (run_folder(a, name) / "summary.json").is_file():
        return write_record(a, name)
    return None


def final_lenient(a, name: str) -> float | None:
    rec = read_record(a, name)
    return None if rec is None else rec["final_lenient"]


def needs_answers(a, name: str) -> bool:
    """A record without per-problem answers (made before records kept them) that a claim needs:
    its rank's best, once that rank's grid is complete (every claim pairs a rank's best)."""
    rec = read_record(a, name)
    if rec is None or rec.get("answers") is not None:
        return False
    return name in best_names(a).values()


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    """(exit status, peak RSS in GiB of the child) -- wait4 reports the child's own peak."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen, or it warns it still runs
    return p.returncode, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def run_arm(a, name: str, arm: dict) -> str:
    folder = run_folder(a, name)
    rerun = needs_answers(a, name)
    if read_record(a, name) is not None and not rerun:
        return "done"
    if arm["lr"] is None:
        return "waiting"
    if folder.exists():
        print(f"  {name}: '{folder}' exists without summary.json (an unfinished run): left as it is; "
              "move it away to run this arm again", flush=True)
        return "unfinished"
    cmd = [sys.executable, "-m", "align.cli", "ppo", "--config", str(a.config), *common(a), *arm["overrides"],
           f"run.output_dir={a.runs}", f"run.name={name}"]
    print(f"  {name}: {' '.join(arm['overrides'])}{' (again: its record has no per-problem answers)' * rerun}",
          flush=True)
    rc, rss = _run(cmd, Path(a.runs) / "logs" / f"{name}.log")
    if rc:
        raise SystemExit(f"{name} failed (exit {rc}); its log: {Path(a.runs) / 'logs' / f'{name}.log'}")
    (folder / "peak_rss.json").write_text(json.dumps({"peak_rss_gib": round(rss, 3)}))
    write_record(a, name)
    return "ran"


def evaluate_base(a) -> Path:
    """The base's greedy answers on the held-out set, once (every run starts from them); kept with
    the records."""
    out = Path(a.records) / "base.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():
        return out
    code = "import sys; from scripts.lora_without_regret import _base_child; _base_child(sys.argv[1:])"
    rc, _ = _run([sys.executable, "-c", code, str(out), str(a.config), *common(a)], Path(a.runs) / "logs" / "base.log")
    if rc:
        raise SystemExit(f"the base evaluation failed; its log: {Path(a.runs) / 'logs' / 'base.log'}")
    return out


def _base_child(argv: list[str]) -> None:
    from align import verifiable
    from align.chat import encode_prompts
    from align.config import load_config
    from align.data.prompts import load_prompts
    from align.models import load_base
    from align.rollout.hf import HFEngine

    out, config, overrides = Path(argv[0]), argv[1], argv[2:]
    cfg = load_config("ppo", config, overrides)
    _, held = load_prompts(cfg.data)
    base, tok = load_base(cfg.model)
    encode_prompts(tok, held, cfg.rollout.max_prompt_tokens)
    report, answers = verifiable.accuracy(HFEngine(base, tok), held, cfg.data.answer_field, cfg.data.difficulty_field,
                                          cfg.rollout.max_new_tokens)
    out.write_text(json.dumps({"accuracy": report, "answers": answers}))


# -- reading the runs --------------------------------------------------------------------------
def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _trainable(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def write_record(a, name: str) -> dict:
    """The arm's record from its finished run folder: what the study reads (curve, sizes, seconds,
    RSS, KL, the dtype and machine it ran on) and the final per-problem answers (lenient, file order)."""
    from align.runs import machine_state

    folder = run_folder(a, name)
    summary = json.loads((folder / "summary.json").read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {m["step"]: m for m in metrics if "kl_per_answer" in m}
    curve, last = [], 0
    for m in (m for m in metrics if "eval/accuracy_lenient" in m):
        its = [i for i in train if last < i <= m["step"]]
        curve.append({"iteration": m["step"], "train_seconds": m["eval/train_seconds"],
                      "lenient": m["eval/accuracy_lenient"], "strict": m["eval/accuracy_strict"],
                      "kl_per_answer": sum(train[i]["kl_per_answer"] for i in its) / max(len(its), 1)})
        last = m["step"]
    weights = Path(summary["adapter"])
    rss = folder / "peak_rss.json"
    manifest = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    final = curve[-1]
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    greedy = [r for r in rows if r.get("split") == "eval_greedy"]
    last_it = max(r["iteration"] for r in greedy)
    rec = {"curve": curve, "final_lenient": final["lenient"], "final_strict": final["strict"],
           "final_kl": final["kl_per_answer"],
           "final_lenient_by_difficulty": {k: v["lenient"] for k, v in
                                           summary["eval_final"]["accuracy"]["greedy"]["by_difficulty"].items()},
           "trainable_params": _trainable(weights), "weights_bytes": _size(weights),
           "seconds_per_iteration": round(final["train_seconds"] / max(summary["iterations"], 1), 2),
           "peak_rss_gib": json.loads(rss.read_text())["peak_rss_gib"] if rss.is_file() else None,
           "iterations": summary["iterations"], "dtype": manifest.get("dtype"),
           "machine": manifest.get("machine") or machine_state(), "commit": (manifest.get("source") or {}).get("commit"),
           "answers": [int(r["lenient"]) for r in greedy if r["iteration"] == last_it]}
    old = record_path(a, name)
    if old.is_file():  # a record without answers, run again: its figures stay beside the new ones
        prev = json.loads(old.read_text())
        rec["earlier"] = prev.get("earlier", []) + [{k: v for k, v in prev.items() if k != "earlier"}]
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps(rec, indent=None, separators=(",", ":")) + "\n")
    return rec


def final_answers(a, name: str) -> list[int] | None:
    """1/0 per held-out problem (lenient) at the run's last evaluation, in file order."""
    rec = read_record(a, name)
    return None if rec is None else rec.get("answers")


def _paired(a, x: str, y: str) -> dict | None:
    """x minus y, paired on the same problems (lenient)."""
    from align.scoring.stats import paired_difference

    ax, ay = final_answers(a, x), final_answers(a, y)
    if ax is None or ay is None:
        return None
    d = paired_difference(ay, ax)  # paired_difference(a, b) is b - a
    return {"a": x, "b": y, "difference": round(d["difference"], 4), "ci95": [round(v, 4) for v in d["ci95"]],
            "n": d["n"]}


def _difference_in_gains(a, lora: tuple[str, str], full: tuple[str, str]) -> dict | None:
    """(LoRA big - LoRA small) - (full big - full small), paired on the same problems (lenient)."""
    from align.scoring.stats import paired_difference

    answers = [final_answers(a, n) for n in (*lora, *full)]
    if any(x is None for x in answers):
        return None
    lb, ls, fb, fs = answers
    d = paired_difference([b - s for b, s in zip(fb, fs)], [b - s for b, s in zip(lb, ls)])
    return {"a": f"{lora[0]} - {lora[1]}", "b": f"{full[0]} - {full[1]}", "difference": round(d["difference"], 4),
            "ci95": [round(v, 4) for v in d["ci95"]], "n": d["n"]}


def batch_verdict(diff: dict | None, margin: float = MARGIN) -> str:
    """"LoRA tolerates large batches less well": its gain from the bigger batch is below full
    fine-tuning's (the paired CI of the difference in gains below zero)."""
    v = verdict(diff, margin)
    if v == "differs":
        return "holds" if diff["ci95"][1] < 0 else "does not hold (LoRA gains more)"
    return {"matches": "does not hold at this scale (the gains match within the margin)"}.get(v, v)


def verdict(diff: dict | None, margin: float = MARGIN) -> str:
    if diff is None:
        return "not paired yet (an arm without per-problem answers runs again)"
    lo, hi = diff["ci95"]
    if -margin <= lo and hi <= margin:
        return "matches"
    if lo > 0 or hi < 0:
        return "differs"
    return "inconclusive"


def ten_x_verdict(ratios, step: float) -> str:
    """LoRA's best rate over full fine-tuning's, against the paper's ~10x: a grid of ``step``-fold
    rates cannot tell factors within one step apart (a rule set after the grid ran)."""
    ok = all(abs(math.log(x / 10)) <= math.log(step) + 1e-9 for x in ratios)
    return "holds within one grid step" if ok else "does not hold"


def report(a, arms: dict[str, dict]) -> dict:
    runs = {}
    for n, v in arms.items():
        rec = read_record(a, n)
        if rec is not None:
            runs[n] = {**v, **{k: x for k, x in rec.items() if k != "answers"}, "has_answers": rec.get("answers") is not None}
    best = best_names(a)  # a rank's best only once its whole grid has run
    claims = {}
    if best.get("1") and best.get("full"):
        d = _paired(a, best["1"], best["full"])
        claims["rank 1 matches full fine-tuning in RL"] = {"comparison": d, "verdict": verdict(d)}
    if best.get("8") and best.get("full"):
        d = _paired(a, best["8"], best["full"])
        claims["rank 8 matches full fine-tuning in RL"] = {"comparison": d, "verdict": verdict(d)}
    for r in ("1", "8"):  # the same comparisons at the second seed: the picks' unselected check
        if f"r{r}-best-seed1" in runs and "rfull-best-seed1" in runs:
            d = _paired(a, f"r{r}-best-seed1", "rfull-best-seed1")
            claims[f"rank {r} matches full fine-tuning in RL (seed 1)"] = {"comparison": d, "verdict": verdict(d)}
    lrs = {r: runs[n]["lr"] for r, n in best.items() if n and r != "full"}
    if len(lrs) >= 2:
        claims["the best LoRA learning rate hardly depends on the rank"] = {
            "best_lr": lrs, "verdict": "holds at this grid's resolution" if len(set(lrs.values())) == 1 else
            "does not hold at this grid's resolution"}
    if best.get("full") and lrs:
        full_lr = runs[best["full"]]["lr"]
        ratio = {r: round(lr / full_lr, 2) for r, lr in lrs.items()}
        step = a.lora_lrs[1] / a.lora_lrs[0]  # the grid's resolution
        claims["LoRA's best learning rate is ~10x full fine-tuning's"] = {
            "ratio": ratio, "verdict": ten_x_verdict(ratio.values(), step),
            "note": f"rule added after the grid ran: within one {step:.0f}x grid step of 10x"}
    if best.get("8"):
        for where, (r, _) in PLACEMENT.items():
            if f"{where}-r{r}" in runs:
                d = _paired(a, f"{where}-r{r}", best["8"])
                claims[f"{where}-only vs all-linear at equal parameters"] = {"comparison": d, "verdict": verdict(d)}
    (ra, _), (rm, _) = PLACEMENT["attention"], PLACEMENT["mlp"]
    if f"mlp-r{rm}" in runs and f"attention-r{ra}" in runs:  # "the MLP above all": MLP-only against attention-only
        d = _paired(a, f"mlp-r{rm}", f"attention-r{ra}")
        claims["mlp-only vs attention-only at equal parameters"] = {"comparison": d, "verdict": verdict(d)}
    big8, bigf = f"r8-batch{BIG_BATCH}x", f"rfull-batch{BIG_BATCH}x"
    if big8 in runs and bigf in runs and best.get("8") and best.get("full"):
        lo = runs[big8]["final_lenient"] - runs[best["8"]]["final_lenient"]
        fu = runs[bigf]["final_lenient"] - runs[best["full"]]["final_lenient"]
        d = _difference_in_gains(a, (big8, best["8"]), (bigf, best["full"]))
        claims["LoRA tolerates large batches less well than full fine-tuning"] = {
            f"gain_from_{BIG_BATCH}x_batch": {"lora_r8": round(lo, 4), "full": round(fu, 4)},
            "comparison": d, "verdict": batch_verdict(d),
            "note": "LoRA's gain minus full fine-tuning's, paired per problem; one seed each (a CI over problems, "
                    "not over seeds); this rule replaced 'LoRA gains less' before the batch arms finished"}
    base = json.loads((Path(a.records) / "base.json").read_text())["accuracy"]["greedy"] \
        if (Path(a.records) / "base.json").is_file() else None
    return {"protocol": {"heldout": a.heldout, "iterations": a.iterations, "eval_every": a.eval_every, "alpha": ALPHA,
                         "lora_lrs": list(a.lora_lrs), "full_lrs": list(a.full_lrs), "margin": MARGIN,
                         "model": a.model or "configs/grpo_arithmetic.yaml's", "dtype": "float32",
                         "settings": common(a)},
            "base": {"lenient": base["lenient"], "strict": base["strict"], "n": base["n"]} if base else None,
            "arms": {n: ("finished" if n in runs else "not run") for n in arms},
            "runs": runs, "best": best, "claims": claims}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _machine(m: dict | None) -> str:
    cpu = (m or {}).get("cpu") or "?"
    return f"{cpu.replace('(R)', '')}, {m.get('cores', '?')} cores" if m else "?"


def markdown(result: dict) -> str:
    """results/lora_without_regret.md: every finished run and every claim's comparison, from the
    JSON alone (so the docs' words never carry a number of their own)."""
    p, base = result["protocol"], result["base"]
    lines = ["# LoRA Without Regret on arithmetic: the runs", "",
             f"Generated by `python scripts/lora_without_regret.py --report-only` from `lora_without_regret.json`. "
             f"Held-out: `{p['heldout']}`, greedy, lenient grader (strict beside it); {p['iterations']} iterations per "
             f"run, evaluated every {p['eval_every']}; LoRA alpha {p['alpha']} at every rank; {p['dtype']}; "
             f"each run alone on a 2-core CPU (seconds and RSS compare only within one machine: the column says "
             f"which). Base: {_pct(base and base['lenient'])} % lenient, "
             f"{_pct(base and base['strict'])} % strict on {base and base['n']} problems. "
             f"Paired: the record keeps the 1,000 per-problem answers a paired CI needs.", "",
             "| run | experiment | rank | LR | seed | lenient % | strict % | KL/answer | trainable params | "
             "weights MB | s/iteration | peak RSS GiB | machine | paired |", "|---" * 14 + "|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['experiment']} | {r['rank']} | {r['lr']:.0e} | {r['seed']} | {_pct(r['final_lenient'])} | "
                     f"{_pct(r['final_strict'])} | {r['final_kl']:.2f} | {r['trainable_params']:,} | "
                     f"{r['weights_bytes'] / 1e6:.2f} | {r['seconds_per_iteration']:.1f} | {r['peak_rss_gib'] or '—'} | "
                     f"{_machine(r.get('machine'))} | {'yes' if r.get('has_answers') else 'no'} |")
    again = [(n, e) for n, r in result["runs"].items() for e in r.get("earlier", [])]
    if again:
        lines += ["", "Run again for their per-problem answers (the first run's figures, on its machine): " + "; ".join(
            f"{n}: {_pct(e['final_lenient'])} % lenient, KL {e['final_kl']:.2f} ({_machine(e.get('machine'))})"
            for n, e in again) + "."]
    waiting = [n for n, s in result["arms"].items() if s != "finished"]
    lines += ["", f"Not run yet ({len(waiting)}): {', '.join(waiting) or 'none'}.", "", "## Claims", "",
              f"Margin written down before the runs: ±{100 * p['margin']:.0f} points (paired 95 % CI on the same problems).", "",
              "| claim | measured | verdict |", "|---|---|---|"]
    for claim, v in result["claims"].items():
        c = v.get("comparison")
        if c:
            measured = (f"{c['a']} − {c['b']}: {100 * c['difference']:+.1f} points "
                        f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}], n={c['n']}")
        else:
            measured = "; ".join(f"{k}: {json.dumps(x)}" for k, x in v.items() if k not in ("verdict", "note"))
        lines.append(f"| {claim} | {measured} | {v.get('verdict', '—')}{' (' + v['note'] + ')' if v.get('note') else ''} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
    base = result["base"]["lenient"] if result["base"] else None
    for rank in RANKS:
        pts = sorted((v["lr"], v["final_lenient"]) for v in runs.values()
                     if v["experiment"] == "rank_lr" and v["rank"] == rank)
        if pts:
            ax[0].plot(*zip(*pts), marker="o", label=f"r={rank}")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("learning rate")
    ax[0].set_title("final held-out accuracy vs LR")
    best = set(result["best"].values())
    for name in [n for n, v in runs.items() if v["experiment"] == "rank_lr"]:
        c, style = runs[name]["curve"], dict(marker="o", lw=2.2 if name in best else 0.9, label=name)
        ax[1].plot([0] + [p["iteration"] for p in c], [base] + [p["lenient"] for p in c], **style)
        ax[2].plot([0] + [p["kl_per_answer"] for p in c], [base] + [p["lenient"] for p in c], **style)
    ax[1].set_xlabel("iteration")
    ax[1].set_title("rank x LR runs (thick: a rank's best)")
    ax[2].set_xlabel("KL per answer to the base (training samples, nats)")
    ax[2].set_title("accuracy vs KL")
    others = [(n, v["final_lenient"]) for n, v in runs.items() if v["experiment"] != "rank_lr"]
    for n in [n for n in result["best"].values() if n]:
        others.insert(0, (n, runs[n]["final_lenient"]))
    if others:
        ax[3].barh([n for n, _ in others], [v for _, v in others])
    ax[3].set_title("final accuracy: best, seed 1, placement, batch", fontsize=9)
    for x in ax[:3]:
        if base is not None:
            x.axhline(base, color="grey", ls=":", label="base")
        x.set_ylabel("held-out greedy accuracy (lenient)")
        x.grid(alpha=0.3)
        x.legend(fontsize=7)
    fig.suptitle(f"LoRA Without Regret on arithmetic ({result['protocol']['heldout']}, float32, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/lora_without_regret", help="the run folders' parent")
    ap.add_argument("--out", default="results/lora_without_regret.json")
    ap.add_argument("--records", default="", help="one record per finished arm (default: --out without .json)")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--model", default="", help="another base (the tiny test model in the test)")
    ap.add_argument("--heldout", default=HELDOUT)
    ap.add_argument("--iterations", type=int, default=ITERATIONS)
    ap.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    ap.add_argument("--ranks", type=lambda s: s.split(","), default=list(RANKS))
    ap.add_argument("--lora-lrs", type=lambda s: [float(x) for x in s.split(",")], default=list(LORA_LRS))
    ap.add_argument("--full-lrs", type=lambda s: [float(x) for x in s.split(",")], default=list(FULL_LRS))
    ap.add_argument("--only", choices=["rank_lr", "seed", "placement", "batch"], help="run one experiment's arms")
    ap.add_argument("--max-runs", type=int, default=0, help="stop after starting this many runs (0 = all)")
    ap.add_argument("--set", action="append", default=[], help="one more config override for every run")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    a.records = a.records or str(Path(a.out).with_suffix(""))
    if not a.report_only:
        evaluate_base(a)
        started = 0
        for _ in range(3):  # later arms learn their learning rates from earlier ones
            for name, arm in all_arms(a).items():
                if a.only and arm["experiment"] != a.only:
                    continue
                if a.max_runs and started >= a.max_runs:
                    break
                started += run_arm(a, name, arm) == "ran"
    result = report(a, all_arms(a))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}: {sum(v == 'finished' for v in result['arms'].values())} of "
          f"{len(result['arms'])} arms finished")
    for claim, v in result["claims"].items():
        print(f"  {claim}: {v.get('verdict', '')} {json.dumps({k: x for k, x in v.items() if k != 'verdict'})}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
