"""results/TABLE.md: the headline numbers, read from the JSON files in results/ -- so no prose can
drift from the files (tests/test_results_table.py regenerates it and compares).

    python scripts/results_table.py            # rewrite results/TABLE.md
    python scripts/results_table.py --check    # exit 1 if results/TABLE.md is out of date
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
TABLE = RESULTS / "TABLE.md"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _minutes(s: float | None) -> str:
    return f"{s / 60:.1f} min" if s else "—"


def _ci(ci: list[float], scale: float = 100, sign: bool = False) -> str:
    f = "{:+.1f}" if sign else "{:.1f}"
    return f"[{f.format(scale * ci[0])}, {f.format(scale * ci[1])}]"


def _dtype(d: dict) -> str:
    return d.get("dtype") or (d.get("compute") or {}).get("peak_dtype") or "float32"


def rows() -> list[tuple[str, str, str, str, str, str]]:
    """(result, file, measure, value, dtype, wall) per headline, in a fixed order."""
    out = []
    if (d := _load("smoke_summary.json")) and "accuracy_change" in d:
        c, i, f = d["accuracy_change"]["lenient"], d["eval_initial"], d["eval_final"]
        out.append(("smoke run (`configs/smoke.yaml`)", "smoke_summary.json",
                    f"held-out greedy accuracy, lenient, {c['n']} problems, paired",
                    f"{_pct(i['accuracy_lenient'])} → {_pct(f['accuracy_lenient'])}: {100 * c['difference']:+.1f} points "
                    f"{_ci(c['ci95'], sign=True)}", _dtype(d), _minutes(d.get("wall_seconds"))))
    if d := _load("dpo_hh_rlhf_summary.json"):
        e = d["eval"]
        out.append(("DPO, HH-RLHF (`align dpo`)", "dpo_hh_rlhf_summary.json",
                    f"held-out implicit accuracy, {e['pairs']} helpful-base pairs", f"{e['implicit_accuracy']:.3f}",
                    _dtype(d), _minutes(d.get("wall_seconds"))))
    if d := _load("rm_hh_rlhf_summary.json"):
        e = d["eval"]
        out.append(("reward model, HH-RLHF (`align rm`)", "rm_hh_rlhf_summary.json",
                    f"held-out pairwise accuracy, {e['pairs']} pairs", f"{e['pairwise_accuracy']:.3f}",
                    _dtype(d), _minutes(d.get("wall_seconds"))))
    if d := _load("grpo_arithmetic_summary.json"):
        i, f = d["eval_initial"], d["eval_final"]
        g = f["accuracy"]["greedy"]
        out.append(("GRPO, arithmetic (`configs/grpo_arithmetic.yaml`)", "grpo_arithmetic_summary.json",
                    "held-out greedy accuracy, lenient, 400 problems",
                    f"{_pct(i['accuracy_lenient'])} → {_pct(f['accuracy_lenient'])} {_ci(g['lenient_ci95'])}",
                    _dtype(d), _minutes(d.get("wall_seconds"))))
    if (d := _load("bench_rl_arithmetic.json")) and d.get("align_time_over_trl_time") is not None:
        out.append(("time to target accuracy, align vs TRL GRPOTrainer", "bench_rl_arithmetic.json",
                    "align's training time / TRL's (base + 15 points)", f"{d['align_time_over_trl_time']:.2f}x",
                    "float32", "—"))
    if (d := _load("bench_rl_arithmetic_sweep.json")) and d.get("picks"):
        picks = ", ".join(f"{side} {p['learning_rate']:g}" for side, p in sorted(d["picks"].items()))
        n = sum("curve" in r for r in d["results"].values())
        out.append(("learning rate of each side, its own sweep (align vs TRL)", "bench_rl_arithmetic_sweep.json",
                    f"highest mean validation accuracy over checkpoints ({n} runs)", picks, "float32", "—"))
    if d := _load("ppo_imdb_demo_summary.json"):

        f = d["eval_final"]
        out.append(("PPO demo, IMDB sentiment", "ppo_imdb_demo_summary.json",
                    "held-out reward gain (initial std) at KL/answer",
                    f"{d['reward_gain_in_initial_std']:+.2f} at {f['kl_per_answer']:.1f} nats", _dtype(d),
                    _minutes(d.get("wall_seconds"))))
    if d := _load("ppo_hh_rlhf_summary.json"):
        s = d["side_by_side"]
        out.append(("RLHF on HH (DPO + RM reward, RM judge)", "ppo_hh_rlhf_summary.json",
                    f"judge prefers the policy, {s['prompts']} held-out prompts",
                    f"{_pct(s['judge_win_rate'])} {_ci(s['judge_win_rate_ci95'])}", _dtype(d), _minutes(d.get("wall_seconds"))))
    if d := _load("eval_ppo_hh_judge256.json"):
        g = d["generation"]
        c = g["comparison"]["ppo-hh-sum"]
        out.append(("RLHF on HH, judged again (`align eval`)", "eval_ppo_hh_judge256.json",
                    f"judge prefers the policy, {g['n']} held-out prompts (length-controlled)",
                    f"{_pct(c['win_rate'])} {_ci(c['win_rate_ci95'])} ({_pct(c['length_controlled_win_rate'])} "
                    f"{_ci(c['length_controlled_ci95'])})", "float32", _minutes(g.get("seconds"))))
    if d := _load("lora_without_regret.json"):
        done = sum(v == "finished" for v in d["arms"].values())
        for claim, v in d["claims"].items():
            c = v.get("comparison")
            value = (f"{100 * c['difference']:+.1f} points {_ci(c['ci95'], sign=True)}" if c else
                     "; ".join(f"{k} {json.dumps(x)}" for k, x in v.items() if k not in ("verdict", "note")))
            out.append((f"LoRA Without Regret: {claim}", "lora_without_regret.json",
                        f"held-out greedy accuracy, lenient, {d['base']['n']} problems ({done} of {len(d['arms'])} runs)",
                        f"{value}: **{v.get('verdict', '—')}**", d["protocol"]["dtype"], "—"))
    if (d := _load("preference_generalisation.json")) and d["decision"]["decided"]:
        dec = d["decision"]
        sig = next(x for x in d["full"] if x["method"] == "sigmoid")
        best = max(dec["two_seeds_so_far"], key=lambda t: t["vs_sigmoid"]["difference"])
        out.append(("DPO losses off their training family (`scripts/bench_preference.py`)", "preference_generalisation.json",
                    "helpful-base normalised margin accuracy, 500 pairs, mean of two seeds; the best against sigmoid, paired",
                    f"sigmoid {sig['off_family_mean']:.3f}; {best['method']} {best['off_family_mean']:.3f}, "
                    f"{100 * best['vs_sigmoid']['difference']:+.1f} points {_ci(best['vs_sigmoid']['ci95'], sign=True)}: "
                    f"**{'default: ' + dec['new_default'] if dec['new_default'] else 'sigmoid stays the default'}**",
                    "float32", f"{sig['wall_minutes_computing_reference']:.0f} min a sigmoid run"))
    for name in ("bench_dtype.json", "bench_dtype_xeon_amx.json"):  # one per machine it ran on
        if d := _load(name):
            m, v = d["machine"], {x["variant"]: x for x in d["variants"]}
            b = v["bf16_base"]
            out.append((f"bf16 vs float32 on {m['cpu']} ({m['bf16_feature'] or 'no native bf16'})", name,
                        f"LoRA train step of SmolLM2-135M, {d['batch']} x {d['length']} tokens: bf16 base's time / fp32's",
                        f"{b['train_step_vs_float32']:.2f}x (forward {b['forward_vs_float32']:.2f}x, peak RSS "
                        f"{b['peak_rss_vs_float32']:.2f}x); `auto` picks {d['machine']['auto_dtype'][0]}",
                        "both", "—"))
    if d := _load("bench_rollout.json"):
        r = d["throughput_ratios"]
        out.append(("rollouts, vLLM vs transformers", "bench_rollout.json",
                    f"tokens/s ratio, batch {d['batch']} x {d['max_new_tokens']}",
                    f"merged {r['vllm_merged_over_hf']:.2f}x, LoRA {r['vllm_lora_over_hf']:.2f}x", "float32", "—"))
    return out


def render() -> str:
    lines = ["# Headline results", "",
             "Generated by `python scripts/results_table.py` from the JSON files beside it (do not edit by hand);",
             "what each file is and the command that made it: [README.md](README.md). Measured on 2-core",
             "x86 CPUs, each run alone: an AMD EPYC with AVX2 (no native bf16), except where a row or its",
             "file names another machine (an Intel Xeon with AMX bf16 ran the 2026-12-01 session).", "",
             "| result | measure | value | dtype | wall | file |", "|---|---|---|---|---|---|"]
    lines += [f"| {r} | {m} | {v} | {dt} | {w} | `{f}` |" for r, f, m, v, dt, w in rows()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with results/TABLE.md instead of writing it")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        same = TABLE.is_file() and TABLE.read_text() == text
        print("results/TABLE.md is up to date" if same else "results/TABLE.md is out of date: run scripts/results_table.py")
        return 0 if same else 1
    TABLE.write_text(text)
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
