"""RL iterations side by side: align's PPO loop (grpo / rloo critic-free, gae with a critic)
against TRL 1.16's GRPOTrainer + PEFT LoRA, at the same settings: SmolLM2-135M, the PPO demo's
IMDB prompts and sentiment reward, the same group size, prompts per step, max new tokens, LR,
KL coefficient, 2 passes over each batch in minibatches of 16. One process per variant, one
after another, each for the same wall-clock budget; then every variant's policy answers the same
64 held-out prompts with the same seed (align's evaluation) for held-out reward and KL.

    python scripts/bench_rl.py --minutes 5 --out results/bench_rl.json
    python scripts/bench_rl.py --task arithmetic --variants align,trl --seeds 0,1 --minutes 6 \
        --out results/bench_rl_arithmetic.json --runs runs/bench_rl_arithmetic

The arithmetic mode measures *time to accuracy*: both sides train on the built-in arithmetic
task with the same algorithm settings, checkpoints are saved at the same marks of the training
clock, and afterwards one evaluator (`align eval --accuracy`, greedy, the fixed 400-problem
held-out set) grades every checkpoint; the time each side needs to reach base + 15 points
(fixed before any run) and its final accuracy are reported. A re-run skips finished runs.

Each side's learning rate comes from its own sweep on the *validation* set (400 two-digit problems
in no held-out file; the sweep's runs train on none of them), never from the held-out one:

    python scripts/bench_rl.py --task arithmetic --sweep --variants align,trl --minutes 3 \
        --out results/bench_rl_arithmetic_sweep.json --runs runs/bench_rl_sweep
    python scripts/bench_rl.py --task arithmetic --variants align,trl --seeds 0,1 --minutes 3 \
        --lr-from results/bench_rl_arithmetic_sweep.json --out results/bench_rl_arithmetic.json

The pick, fixed before the sweep ran: the rate with the highest mean validation accuracy over a
run's checkpoints (about the area under its accuracy-vs-time curve: it rewards getting there early
as well as the level), the lower rate on a tie.

Per variant: seconds per iteration split into generation / scoring / update, answers per
second, peak RSS, held-out reward and KL; JSON + PNG (reward vs wall-clock and vs KL). A
``base_only`` row is the base model loaded alone for inference (generate + score), the memory
yardstick for PPO's peak RSS (the median of three processes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data.eval_prompts=64", "rollout.max_new_tokens=24", "ppo.prompts_per_iteration=16",
          "ppo.samples_per_prompt=2", "ppo.minibatch_size=16", "ppo.ppo_epochs=2", "ppo.learning_rate=5e-4",
          "ppo.kl_coef=0.05", "ppo.eval_every=0", "ppo.iterations=1000", "run.save_every=0", "run.plot=false"]
VARIANTS = {
    "trl_grpo": None,
    "align_grpo": ["ppo.advantage=grpo", "ppo.old_logprobs=engine"],
    "align_rloo": ["ppo.advantage=rloo", "ppo.old_logprobs=engine"],
    "align_rloo_unpacked": ["ppo.advantage=rloo", "ppo.pack=false", "ppo.old_logprobs=trainer"],
    "align_gae": ["ppo.advantage=gae", "ppo.critic=separate"],
    "align_gae_shared": ["ppo.advantage=gae", "ppo.critic=shared"],
    "base_only": None,
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _cfg(extra: list[str], out: str, name: str):
    from align.config import load_config

    return load_config("ppo", ROOT / "configs/ppo_imdb_sentiment.yaml",
                       [*COMMON, *extra, f"run.output_dir={out}", f"run.name={name}"])


def run_align(name: str, extra: list[str], minutes: float, out: str) -> dict:
    from align.ppo import run_ppo

    cfg = _cfg([*extra, f"ppo.time_budget_minutes={minutes}"], out, name)
    t0 = time.time()
    summary = run_ppo(cfg)
    records = [json.loads(line) for line in (Path(out) / name / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in records if "reward_mean" in r]
    split = {k: sum(r.get(f"seconds_{k}", 0.0) for r in its) / len(its) for k in ("generate", "reward", "score", "update", "sync")}
    answers = len(its) * 32
    # the iterations' own seconds: align's held-out evaluations (initial one included) run inside
    # its wall-clock budget, TRL's after it, so speed is compared on iteration time alone
    iter_seconds = summary["train_seconds"] - summary["compute"]["phases"]["evaluate"]["seconds"]
    return {"variant": name, "iterations": len(its), "answers": answers,
            "train_seconds": summary["train_seconds"], "iteration_seconds": iter_seconds,
            "answers_per_s": answers / iter_seconds,
            "seconds_per_iteration": iter_seconds / len(its), "split_seconds_per_iteration": split,
            "eval_initial": summary["eval_initial"], "eval_final": summary["eval_final"],
            "curve": _cumulative([(r.get("iteration_seconds", 0.0), r["reward_mean"], r["kl_per_answer"]) for r in its]),
            "compute": summary.get("compute"), "wall_seconds": time.time() - t0, "peak_rss_gib": peak_rss_gib()}


def _cumulative(points):
    """(seconds of each iteration, reward, kl) -> (seconds since the start, reward, kl)."""
    out, t = [], 0.0
    for dt, r, kl in points:
        t += dt
        out.append((round(t, 1), r, kl))
    return out


def _heldout(ac, engine, tok, cfg, held) -> dict:
    from align.ppo.heldout import evaluate_prompts
    from align.scorers import make_reward

    ev = evaluate_prompts(ac, engine, tok, held, make_reward(cfg.reward, ac, tok, "reward", cfg.model.name), cfg,
                          cfg.run.seed + 12345)
    ev.pop("answers"), ev.pop("completions")
    return ev


def heldout_of_policy(cfg, lora_state: dict) -> tuple[dict, dict]:
    """(initial, final) held-out numbers of align's evaluation -- the same 64 prompts, sampling
    seed, reward and KL -- for the untrained policy and for one whose LoRA weights are ``lora_state``."""
    from peft import set_peft_model_state_dict

    from align.chat import encode_prompts
    from align.data.prompts import load_prompts
    from align.models import load_base
    from align.ppo.actor_critic import ActorCritic
    from align.rollout.hf import HFEngine

    _, held = load_prompts(cfg.data)
    base, tok = load_base(cfg.model)
    encode_prompts(tok, held, cfg.rollout.max_prompt_tokens)
    ac = ActorCritic(base, cfg.lora, with_critic=False)  # a fresh LoRA (B = 0) answers as the base
    engine = HFEngine(ac.model, tok)
    initial = _heldout(ac, engine, tok, cfg, held)
    set_peft_model_state_dict(ac.model, lora_state)
    return initial, _heldout(ac, engine, tok, cfg, held)


def heldout_of_saved_adapter(name: str, out: str) -> dict:
    """An align variant's held-out numbers from the adapter its run saved (for a run whose own
    final evaluation is missing: before 2026-11-24, ``ppo.eval_every=0`` skipped it)."""
    from safetensors.torch import load_file

    cfg = _cfg(VARIANTS[name], out, name)
    saved = load_file(str(Path(out) / name / "adapter" / "adapter_model.safetensors"))
    initial, final = heldout_of_policy(cfg, saved)
    return {"eval_initial": initial, "eval_final": final}


def run_trl(minutes: float, out: str) -> dict:
    """TRL GRPOTrainer + PEFT LoRA at align's settings, stopped after the same wall time."""
    import datasets
    import torch
    from peft.utils import get_peft_model_state_dict
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.data.prompts import load_prompts
    from align.models import load_base, lora_peft_config
    from reward.api import load_reward_fn

    cfg = _cfg([], out, "trl_grpo")
    torch.manual_seed(cfg.run.seed)
    train, _ = load_prompts(cfg.data)
    base, tok = load_base(cfg.model)
    sentiment = load_reward_fn(cfg.reward.function)

    def reward(prompts, completions, **kw):  # TRL hands chat completions as message lists
        return sentiment(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions])

    times = {"generate": 0.0, "prepare": 0.0, "step": 0.0}
    curve = []  # (seconds, training reward, kl) at each of TRL's logging steps

    class Timed(GRPOTrainer):
        def _generate(self, *a, **k):
            t = time.perf_counter()
            try:
                return super()._generate(*a, **k)
            finally:
                times["generate"] += time.perf_counter() - t

        def _prepare_inputs(self, *a, **k):
            t = time.perf_counter()
            try:
                return super()._prepare_inputs(*a, **k)
            finally:
                times["prepare"] += time.perf_counter() - t

        def training_step(self, *a, **k):
            t = time.perf_counter()
            try:
                return super().training_step(*a, **k)
            finally:
                times["step"] += time.perf_counter() - t

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                curve.append((round(time.time() - self.t0, 1), logs["reward"], logs.get("kl", 0.0)))

        def on_step_end(self, args, state, control, **kw):
            if time.time() - self.t0 > 60 * minutes:
                control.should_training_stop = True

    args = GRPOConfig(
        output_dir=str(Path(out) / "trl_grpo"), per_device_train_batch_size=16, gradient_accumulation_steps=1,
        steps_per_generation=2, num_generations=2, num_iterations=2, max_completion_length=24,
        learning_rate=5e-4, beta=0.05, temperature=1.0, top_p=1.0, logging_steps=1, report_to="none",
        use_cpu=True, max_steps=10_000, save_strategy="no", seed=cfg.run.seed, disable_tqdm=True,
        warmup_steps=0, lr_scheduler_type="constant", bf16=False)  # TRL defaults to bf16 autocast: fp32 as align
    ds = datasets.Dataset.from_list([{"prompt": p["messages"]} for p in train])
    trainer = Timed(model=base, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                    peft_config=lora_peft_config(cfg.lora), callbacks=[Budget()])
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0
    steps = trainer.state.global_step
    generations = steps // 4  # 2 steps per generation batch x 2 iterations over it
    # held-out: TRL's adapter into align's evaluation (same prompts, seed, reward, KL)
    initial, final = heldout_of_policy(cfg, get_peft_model_state_dict(trainer.model))
    answers = generations * 32
    prep = times["prepare"]
    return {"variant": "trl_grpo", "iterations": generations, "optimizer_steps": steps, "answers": answers,
            "train_seconds": train_seconds, "answers_per_s": answers / train_seconds,
            "seconds_per_iteration": train_seconds / max(1, generations),
            "split_seconds_per_iteration": {"generate": times["generate"] / max(1, generations),
                                            "score": (prep - times["generate"]) / max(1, generations),
                                            "update": (times["step"] - prep) / max(1, generations)},
            "eval_initial": initial, "eval_final": final, "curve": curve, "peak_rss_gib": peak_rss_gib()}


def run_base_only(out: str) -> dict:
    """The base model alone, for inference: generate 32 answers and score them once."""
    import torch

    from align.chat import encode_prompts
    from align.data.prompts import load_prompts
    from align.models import load_base
    from align.scoring.batch import rows_batch
    from align.rollout.base import SamplingConfig
    from align.rollout.hf import HFEngine

    cfg = _cfg([], out, "base_only")
    train, _ = load_prompts(cfg.data)
    base, tok = load_base(cfg.model)
    encode_prompts(tok, train[:16], cfg.rollout.max_prompt_tokens)
    comps = HFEngine(base, tok).generate([p["ids"] for p in train[:16] for _ in range(2)],
                                         SamplingConfig(24, 1.0, 1.0, seed=0))
    tb = rows_batch(comps, tok.pad_token_id)
    with torch.no_grad():
        base(input_ids=tb.input_ids, attention_mask=tb.attention_mask)
    return {"variant": "base_only", "peak_rss_gib": peak_rss_gib()}


def child(name: str, minutes: float, out: str, heldout_only: bool = False) -> None:
    if heldout_only:
        res = heldout_of_saved_adapter(name, out)
    elif name == "trl_grpo":
        res = run_trl(minutes, out)
    elif name == "base_only":
        res = run_base_only(out)
    else:
        res = run_align(name, VARIANTS[name], minutes, out)
    print("BENCH_RESULT " + json.dumps(res), flush=True)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in results.items() if "answers_per_s" in v}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(rows)
    axes[0].bar(names, [rows[n]["answers_per_s"] for n in names], color=[plt.get_cmap("tab10")(i) for i in range(len(names))])
    axes[0].set_title("answers per second (higher is better)")
    axes[0].tick_params(axis="x", rotation=30)
    for i, n in enumerate(names):
        color = plt.get_cmap("tab10")(i)  # one colour per variant in every panel
        ev = [rows[n]["eval_initial"], rows[n]["eval_final"]]
        axes[1].plot([0, rows[n]["train_seconds"]], [e["reward_mean"] for e in ev], marker="o", label=n, color=color)
        axes[2].plot([e["kl_per_answer"] for e in ev], [e["reward_mean"] for e in ev], marker="o", label=n, color=color)
        curve = rows[n].get("curve") or []
        if curve:
            axes[1].plot([c[0] for c in curve], [c[1] for c in curve], lw=0.8, alpha=0.5, color=color)
            axes[2].plot([c[2] for c in curve], [c[1] for c in curve], lw=0.8, alpha=0.5, color=color)
    axes[1].set(title="held-out reward (dots) and training reward (thin) vs wall-clock", xlabel="seconds of training")
    axes[2].set(title="reward vs KL per answer (held-out dots, training thin)", xlabel="KL (nats per answer)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# -- time to accuracy on the arithmetic task (--task arithmetic) ------------------------------
# Shared algorithm settings, as configs/grpo_arithmetic.yaml sets them: a group of 8 answers to
# each of 8 problems per generation, 20 new tokens, 2 optimizer steps of 32 answers per generation
# (one pass), KL to the reference as a k3 loss term with coefficient 0.02, token-mean loss, group
# std scaling, LoRA r=8 alpha 16 on all linear layers, fp32, temperature 1.
TASK_CONFIG = ROOT / "configs/grpo_arithmetic.yaml"
CHECKPOINT_SECONDS = (30, 60, 120, 180, 240, 300, 420, 600, 900)  # of training, evaluation excluded
TARGET_POINTS = 15  # the target, fixed before any run: the base's held-out greedy lenient accuracy + 15 points
SWEEP_LRS = (2.5e-4, 5e-4, 1e-3, 2e-3)  # each side's own learning-rate sweep (--sweep)
HELDOUT, VALIDATION = "arithmetic-heldout", "arithmetic-validation"


def task_name(side: str, lr: float, seed: int) -> str:
    return f"{side}_lr{lr:g}_s{seed}"


def run_align_task(minutes: float, out: str, seed: int, lr: float, eval_set: str = HELDOUT) -> dict:
    """align's PPO loop on the arithmetic task for ``minutes`` of training; a checkpoint after
    every iteration (evaluated afterwards: only the held-out problem 0 is evaluated in the loop,
    so the loop's own evaluations cost nothing)."""
    from align.config import load_config
    from align.ppo import run_ppo

    name = task_name("align", lr, seed)
    cfg = load_config("ppo", TASK_CONFIG, [
        f"data.eval_dataset={eval_set}", "data.eval_prompts=1", "ppo.eval_every=0", "ppo.eval_pass_k=0", "run.save_every=1", "run.keep_last=1000",
        f"ppo.learning_rate={lr}", f"run.seed={seed}", f"data.seed={seed}", "ppo.time_budget_minutes=0",
        "ppo.iterations=100000", "run.plot=false", f"run.output_dir={out}", f"run.name={name}"])
    import align.ppo.trainer as trainer

    budget = 60 * minutes
    original = trainer.PPOLoop.out_of_time

    def out_of_training_time(loop) -> bool:  # the training clock: the loop's own iterations only
        return sum(r.get("iteration_seconds", 0.0) for r in loop.run.read_metrics()) > budget

    trainer.PPOLoop.out_of_time = out_of_training_time
    try:
        t0 = time.time()
        run_ppo(cfg)
    finally:
        trainer.PPOLoop.out_of_time = original
    records = [json.loads(line) for line in (Path(out) / name / "metrics.jsonl").read_text().splitlines()]
    clock, checkpoints = 0.0, []
    for r in records:
        if "iteration_seconds" in r:
            clock += r["iteration_seconds"]
            checkpoints.append((round(clock, 1), str(Path(out) / name / "checkpoints" / f"step-{r['step']}")))
    picked = _on_schedule(checkpoints)
    for _, path in checkpoints:  # this run's own checkpoints off the schedule: ~30 MB each
        if (_, path) not in picked and Path(path).is_dir():
            shutil.rmtree(path)
    return {"variant": name, "side": "align", "seed": seed, "learning_rate": lr, "eval_set": eval_set, "wall_seconds": time.time() - t0,
            "iterations": len(checkpoints), "checkpoints": picked, "peak_rss_gib": peak_rss_gib()}


def _on_schedule(checkpoints: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """The last checkpoint at or before each CHECKPOINT_SECONDS mark (and the final one)."""
    picked = []
    for mark in CHECKPOINT_SECONDS:
        before = [c for c in checkpoints if c[0] <= mark]
        if before and before[-1] not in picked:
            picked.append(before[-1])
    if checkpoints and checkpoints[-1] not in picked:
        picked.append(checkpoints[-1])
    return picked


def run_trl_task(minutes: float, out: str, seed: int, lr: float, eval_set: str = HELDOUT) -> dict:
    """TRL GRPOTrainer + PEFT LoRA on the same task, prompts, reward and settings; the adapter is
    saved at the same training-clock marks (saving time excluded from the clock)."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.config import load_config
    from align.data.prompts import load_prompts
    from align.models import load_base, lora_peft_config
    from reward.verify import numeric_match

    name = task_name("trl", lr, seed)
    # the same training problems as align's run: none of ``eval_set``'s
    cfg = load_config("ppo", TASK_CONFIG, [f"run.seed={seed}", f"data.seed={seed}", f"data.eval_dataset={eval_set}"])
    torch.manual_seed(seed)
    train, _ = load_prompts(cfg.data)
    base, tok = load_base(cfg.model)
    folder = Path(out) / name
    saved: list[tuple[float, str]] = []

    class Clock(TrainerCallback):
        """Training seconds, saving excluded; the adapter at each mark; stop at the budget."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.paused, self.marks = time.time(), 0.0, list(CHECKPOINT_SECONDS)

        def on_step_end(self, args, state, control, model=None, **kw):
            clock = time.time() - self.t0 - self.paused
            if state.global_step % 2 == 0 and (self.marks and clock >= self.marks[0] or clock > 60 * minutes):
                t = time.time()  # after a whole generation batch (2 optimizer steps), as align's iteration
                path = folder / "checkpoints" / f"step-{state.global_step}"
                model.save_pretrained(str(path))
                saved.append((round(clock, 1), str(path)))
                while self.marks and clock >= self.marks[0]:
                    self.marks.pop(0)
                self.paused += time.time() - t
            if clock > 60 * minutes and state.global_step % 2 == 0:
                control.should_training_stop = True

    p, r = cfg.ppo, cfg.rollout
    args = GRPOConfig(
        output_dir=str(folder), per_device_train_batch_size=p.minibatch_size, gradient_accumulation_steps=1,
        steps_per_generation=p.samples_per_prompt * p.prompts_per_iteration // p.minibatch_size,
        num_generations=p.samples_per_prompt, num_iterations=p.ppo_epochs, max_completion_length=r.max_new_tokens,
        learning_rate=lr, beta=p.kl_coef, epsilon=p.clip_range, temperature=r.temperature, top_p=r.top_p,
        loss_type="dapo", scale_rewards="group", logging_steps=1, report_to="none", use_cpu=True,
        max_steps=1_000_000, save_strategy="no", seed=seed, disable_tqdm=True, warmup_steps=0,
        lr_scheduler_type="constant", max_grad_norm=p.max_grad_norm,
        bf16=False)  # GRPOConfig defaults to bf16 autocast (emulated, ~20x slower on a CPU without bf16): fp32 as align
    ds = datasets.Dataset.from_list([{"prompt": q["messages"], "answer": q["fields"]["answer"]} for q in train])
    trainer = GRPOTrainer(model=base, reward_funcs=[numeric_match], args=args, train_dataset=ds, processing_class=tok,
                          peft_config=lora_peft_config(cfg.lora), callbacks=[Clock()])
    t0 = time.time()
    trainer.train()
    return {"variant": name, "side": "trl", "seed": seed, "learning_rate": lr, "eval_set": eval_set, "wall_seconds": time.time() - t0,
            "iterations": trainer.state.global_step // 2, "checkpoints": saved, "peak_rss_gib": peak_rss_gib()}


def evaluate_checkpoints(res: dict) -> dict:
    """One evaluator for both sides: `align eval --accuracy` on the run's evaluation set (the fixed
    held-out set, or the validation set in a sweep; greedy, the base and every checkpoint's adapter
    from one vLLM engine), evaluation off the clock."""
    import tempfile

    from align.evaluation import run_eval

    cfg_tokens = 20
    with tempfile.TemporaryDirectory() as tmp:
        got = run_eval([c[1] for c in res["checkpoints"]], accuracy=res.get("eval_set", HELDOUT),
                       max_new_tokens=cfg_tokens, out=str(Path(tmp) / "eval"),
                       base="HuggingFaceTB/SmolLM2-135M-Instruct")["accuracy"]
    models = got["models"]
    names = [n for n in models if n != "base"]
    curve = [(sec, models[n]["lenient"], models[n]["strict"]) for (sec, _), n in zip(res["checkpoints"], names)]
    base = models["base"]["lenient"]
    target = base + TARGET_POINTS / 100
    reached = next((sec for sec, acc, _ in curve if acc >= target), None)
    return {**res, "base_lenient": base, "base_strict": models["base"]["strict"], "target_lenient": target,
            "seconds_to_target": reached, "curve": curve, "final_lenient": curve[-1][1] if curve else None,
            "final_strict": curve[-1][2] if curve else None, "eval_engine": got["engine"]}


def task_main(a) -> None:
    """``--task arithmetic``: each side (align, TRL) per seed and learning rate in its own process,
    then every checkpoint evaluated by one evaluator; JSON + PNG with accuracy vs training seconds.
    ``--sweep``: every rate of ``--lrs`` per side on the validation set (seed 0), and each side's pick."""
    out = Path(a.out)
    stored = json.loads(out.read_text()) if out.exists() else {}
    results, elsewhere = on_this_machine(_renamed(stored.get("results", {})), stored.get("other_machines", {}))
    lrs = {side: _side_lrs(a, side) for side in a.variants.split(",")}
    eval_set = VALIDATION if a.sweep else HELDOUT
    chosen = None if a.sweep else {side: grid[0] for side, grid in lrs.items()}

    def write() -> None:  # after every run: a cut sweep keeps what it measured
        out.write_text(json.dumps(_task_summary(results, a.sweep, chosen, a.lrs if a.sweep else None, elsewhere), indent=2))

    for seed in [0] if a.sweep else [int(x) for x in a.seeds.split(",")]:
        for i in range(max(map(len, lrs.values()))):
            for side, grid in lrs.items():
                if i >= len(grid):
                    continue
                name = task_name(side, grid[i], seed)
                if name in results and "curve" in results[name]:
                    continue  # finished before: skipped on a re-run
                results[name] = _child(a, f"task:{side}:{seed}:{grid[i]}:{eval_set}")
                print(name, {k: results[name].get(k) for k in ("seconds_to_target", "final_lenient", "error")}, flush=True)
                write()
    write()
    plot_task(results, out.with_suffix(".png"), "validation" if a.sweep else "held-out")


def on_this_machine(results: dict, elsewhere: dict, here: dict | None = None) -> tuple[dict, dict]:
    """(results made on this machine, those made on another -- kept, outside every pick and ratio).
    Training seconds compare within one CPU only, so a result from another machine (or one from
    before results named their machine) is run again here, never mixed into a ratio."""
    if here is None:
        from align.runs import machine_state

        here = machine_state()
    key = json.dumps(here, sort_keys=True)
    kept, moved = {}, dict(elsewhere)
    for name, r in results.items():
        if json.dumps(r.get("machine"), sort_keys=True) == key:
            kept[name] = r
        else:
            moved[f"{name}@{(r.get('machine') or {}).get('cpu', 'unrecorded machine')}"] = r
    return kept, moved


def _side_lrs(a, side: str) -> list[float]:
    if a.sweep:
        return list(a.lrs)
    if a.lr_from:
        picks = json.loads(Path(a.lr_from).read_text())["picks"]
        if side not in picks:
            raise SystemExit(f"--lr-from {a.lr_from}: no pick for '{side}' (its sweep has not finished)")
        return [picks[side]["learning_rate"]]
    return [a.lr_align if side == "align" else a.lr_trl]


def _renamed(results: dict) -> dict:
    """Results written before names carried the learning rate (``align_s0``) under today's names."""
    return {task_name(r["side"], r["learning_rate"], r["seed"]) if "side" in r and "_lr" not in n else n: r
            for n, r in results.items()}


def sweep_picks(results: dict, grid=None) -> dict:
    """Each side's learning rate: the highest mean validation accuracy over a run's checkpoints
    (the lower rate on a tie), once every rate of ``grid`` (default: those present) has finished
    for that side on one machine -- a half-run sweep, or one spread over two CPUs (whose training
    seconds differ), picks nothing."""
    picks = {}
    for side in sorted({r["side"] for r in results.values() if "side" in r}):
        runs = [r for r in results.values() if r.get("side") == side]
        if any("curve" not in r for r in runs) or not set(grid or []) <= {r["learning_rate"] for r in runs}:
            continue
        if len({json.dumps(r.get("machine"), sort_keys=True) for r in runs}) > 1:
            continue
        score = {r["learning_rate"]: sum(c[1] for c in r["curve"]) / len(r["curve"]) for r in runs}
        best = max(sorted(score), key=lambda lr: score[lr])  # max keeps the first (lowest) of equals
        picks[side] = {"learning_rate": best, "mean_validation_lenient": {f"{lr:g}": round(v, 4) for lr, v in sorted(score.items())}}
    return picks


def _task_summary(results: dict, sweep: bool = False, chosen: dict | None = None, grid=None,
                  elsewhere: dict | None = None) -> dict:
    """The sweep's picks, or the time-to-target ratio at each side's ``chosen`` learning rate (the
    mean over seeds of each side; results at other rates stay in the file, outside the ratio)."""
    settings = {"config": str(TASK_CONFIG.relative_to(ROOT)), "checkpoint_seconds": CHECKPOINT_SECONDS,
                "target": f"base greedy lenient accuracy + {TARGET_POINTS} points, fixed before the runs"}
    if sweep:
        return {"settings": {**settings, "eval_set": VALIDATION, "rule": "highest mean validation lenient accuracy "
                             "over a run's checkpoints, the lower rate on a tie (fixed before the sweep)"},
                "lrs": sorted(grid or []), "picks": sweep_picks(results, grid), "results": results,
                "other_machines": elsewhere or {}}
    times: dict = {}
    for r in results.values():
        if r.get("seconds_to_target") is not None and (chosen or {}).get(r["side"], r["learning_rate"]) == r["learning_rate"]:
            times.setdefault(r["side"], []).append(r["seconds_to_target"])
    ratio = None
    if times.get("align") and times.get("trl"):
        ratio = round((sum(times["align"]) / len(times["align"])) / (sum(times["trl"]) / len(times["trl"])), 3)
    return {"settings": {**settings, "eval_set": HELDOUT, "learning_rates": chosen},
            "align_time_over_trl_time": ratio, "results": results, "other_machines": elsewhere or {}}


def plot_task(results: dict, png: Path, which: str = "held-out") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = {"align": "tab:blue", "trl": "tab:orange"}
    lrs = sorted({r["learning_rate"] for r in results.values() if r.get("curve")})
    styles, markers = ["-", "--", "-.", ":", (0, (5, 1))], ["o", "s", "^", "v", "D"]
    for name, r in sorted(results.items()):
        if not r.get("curve"):
            continue
        xs = [0] + [c[0] for c in r["curve"]]
        k = lrs.index(r["learning_rate"]) % len(styles)  # one line style and marker per rate
        ax.plot(xs, [100 * r["base_lenient"]] + [100 * c[1] for c in r["curve"]], marker=markers[k], ls=styles[k],
                color=colours.get(r["side"]), alpha=0.6 + 0.4 * (r["seed"] == 0), label=name)
        ax.axhline(100 * r["target_lenient"], color="grey", ls=":", lw=0.8)
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel=f"{which} greedy accuracy, lenient (%)",
           title="time to accuracy: arithmetic, SmolLM2-135M + LoRA r=8 (dotted: target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall time per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="results/bench_rl.json")
    ap.add_argument("--runs", default="runs/bench_rl")
    ap.add_argument("--heldout-only", action="store_true",
                    help="no training: re-evaluate the align variants' saved adapters (under --runs) and "
                         "put their held-out numbers into the existing --out JSON")
    ap.add_argument("--task", choices=["answers-per-second", "arithmetic"], default="answers-per-second",
                    help="arithmetic: time to a fixed held-out accuracy, align vs TRL (--variants align,trl)")
    ap.add_argument("--seeds", default="0", help="--task arithmetic: seeds, comma-separated")
    ap.add_argument("--lr-align", type=float, default=5e-4, help="--task arithmetic: align's learning rate")
    ap.add_argument("--lr-trl", type=float, default=5e-4, help="--task arithmetic: TRL's learning rate")
    ap.add_argument("--sweep", action="store_true",
                    help="--task arithmetic: each side at every --lrs rate on the validation set, and its pick")
    ap.add_argument("--lrs", type=lambda v: [float(x) for x in v.split(",")], default=list(SWEEP_LRS))
    ap.add_argument("--lr-from", help="--task arithmetic: take each side's learning rate from this --sweep JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child and a.child.startswith("task:"):
        _, side, seed, lr, eval_set = a.child.split(":")
        res = (run_align_task if side == "align" else run_trl_task)(a.minutes, a.runs, int(seed), float(lr), eval_set)
        from align.runs import machine_state

        res["machine"] = machine_state()  # training seconds compare within one machine only
        print("BENCH_RESULT " + json.dumps(evaluate_checkpoints(res)), flush=True)
        return
    if a.child:
        return child(a.child, a.minutes, a.runs, a.heldout_only)
    if a.task == "arithmetic":
        return task_main(a)
    out, results = Path(a.out), {}
    if a.heldout_only:
        return fill_heldout(a, out)
    for name in a.variants.split(","):
        results[name] = _base_only(a) if name == "base_only" else _child(a, name)
        print(name, {k: v for k, v in results[name].items() if k in ("answers_per_s", "peak_rss_gib", "error")}, flush=True)
        out.write_text(json.dumps(_with_ratios(results), indent=2))
    plot(results, out.with_suffix(".png"))


def _child(a, name: str, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--minutes", str(a.minutes), "--runs", a.runs,
                           "--lr-align", str(a.lr_align), "--lr-trl", str(a.lr_trl), *extra],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if proc.returncode or not line:
        return {"variant": name, "error": proc.stderr[-3000:]}
    return json.loads(line[-1][len("BENCH_RESULT "):])


def _base_only(a, repeats: int = 3) -> dict:
    """The memory yardstick, in ``repeats`` fresh processes: one process's peak RSS varies by
    ~10 % from run to run (malloc's heap layout), so the median is the figure and all are kept."""
    runs = [_child(a, "base_only") for _ in range(repeats)]
    peaks = sorted(r["peak_rss_gib"] for r in runs if "peak_rss_gib" in r)
    if not peaks:
        return runs[0]
    return {"variant": "base_only", "peak_rss_gib": peaks[len(peaks) // 2], "peak_rss_gib_runs": peaks}


def fill_heldout(a, out: Path) -> None:
    results = json.loads(out.read_text())["results"]
    for name, r in results.items():
        if name.startswith("align_") and "eval_final" in r:
            got = _child(a, name, "--heldout-only")
            if "error" in got:
                raise SystemExit(f"{name}: {got['error']}")
            r.update(got, eval_final_source="the run's saved adapter, evaluated after the run (bench_rl --heldout-only)")
            print(name, {k: round(got["eval_final"][k], 3) for k in ("reward_mean", "kl_per_answer")}, flush=True)
    out.write_text(json.dumps(_with_ratios(results), indent=2))
    plot(results, out.with_suffix(".png"))


def _with_ratios(results: dict) -> dict:
    trl = results.get("trl_grpo", {}).get("answers_per_s")
    base = results.get("base_only", {}).get("peak_rss_gib")
    for r in results.values():
        if trl and "answers_per_s" in r:
            r["answers_per_s_vs_trl"] = round(r["answers_per_s"] / trl, 2)
        if base and "peak_rss_gib" in r:
            r["peak_rss_vs_base_only"] = round(r["peak_rss_gib"] / base, 2)
    return {"settings": {"common": COMMON, "variants": VARIANTS}, "results": results}


if __name__ == "__main__":
    main()
