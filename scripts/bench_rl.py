"""RL iterations side by side: align's PPO loop (grpo / rloo critic-free, gae with a critic)
against TRL 1.16's GRPOTrainer + PEFT LoRA, at the same settings: SmolLM2-135M, the PPO demo's
IMDB prompts and sentiment reward, the same group size, prompts per step, max new tokens, LR,
KL coefficient, 2 passes over each batch in minibatches of 16. One process per variant, one
after another, each for the same wall-clock budget; then every variant's policy answers the same
64 held-out prompts with the same seed (align's evaluation) for held-out reward and KL.

    python scripts/bench_rl.py --minutes 5 --out results/bench_rl.json

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
    from align.ppo.evaluate import evaluate_prompts
    from align.scorers import make_reward

    ev = evaluate_prompts(ac, engine, tok, held, make_reward(cfg.reward, ac, tok, "reward", cfg.model.name), cfg,
                          cfg.run.seed + 12345)
    ev.pop("answers")
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
        warmup_steps=0, lr_scheduler_type="constant")
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
    from align.batch import rows_batch
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall time per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="results/bench_rl.json")
    ap.add_argument("--runs", default="runs/bench_rl")
    ap.add_argument("--heldout-only", action="store_true",
                    help="no training: re-evaluate the align variants' saved adapters (under --runs) and "
                         "put their held-out numbers into the existing --out JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.minutes, a.runs, a.heldout_only)
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
                           *extra], capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
