"""Held-out accuracy on prompts with reference answers: what RL with a verifier is judged by.

Two graders side by side (:mod:`reward.verify`): *strict* -- the answer is just the number, and
it is right (what the prompt asks) -- and *lenient* -- the last number in the answer is right. A
policy that only learns the format raises strict, not lenient; one that learns the skill raises
lenient. Greedy accuracy (one answer per prompt, decoding without sampling) and pass@k (k answers
sampled: right at least once) are reported overall and per difficulty, with 95 % intervals.
Used by `align ppo`'s evaluations and by `align eval --accuracy`.
"""
from __future__ import annotations

from collections import defaultdict

from reward.verify import missing, number_only_match, numeric_match

from .rollout.base import SamplingConfig
from .scoring.stats import wilson_ci95

GRADERS = {"strict": number_only_match, "lenient": numeric_match}


def graded(prompts: list[dict], answer_field: str) -> list[dict]:
    """The prompts that carry a reference answer in ``answer_field`` (a blank or NaN one is none:
    :func:`reward.verify.missing`)."""
    return [p for p in prompts if answer_field and not missing(p.get("fields", {}).get(answer_field))]


def grade(texts: list[str], answers: list) -> dict[str, list[float]]:
    """Each grader's 0/1 per answer."""
    return {name: fn(texts, answer=answers) for name, fn in GRADERS.items()}


def _summarise(marks: dict[str, list[float]], kinds: list[str]) -> dict:
    n = len(kinds)
    out: dict = {"n": n}
    for name, values in marks.items():
        out[name] = sum(values) / n
        out[f"{name}_ci95"] = list(wilson_ci95(sum(values), n))
    by: dict[str, dict] = defaultdict(lambda: {name: 0.0 for name in marks} | {"n": 0})
    for i, kind in enumerate(kinds):
        by[kind]["n"] += 1
        for name, values in marks.items():
            by[kind][name] += values[i]
    out["by_difficulty"] = {k: {name: v[name] / v["n"] for name in marks} | {"n": v["n"]}
                            for k, v in sorted(by.items())}
    return out


def accuracy(engine, prompts: list[dict], answer_field: str, difficulty_field: str,
             max_new_tokens: int, pass_k: int = 0, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, first_samples: list | None = None) -> tuple[dict, list[dict]] | tuple[None, list]:
    """Greedy accuracy (and pass@``pass_k`` at ``temperature``) of ``engine``'s current model on
    the graded ``prompts`` (``ids`` + ``fields``); returns (report, greedy answers with their
    grades). (None, []) when no prompt carries ``answer_field``. ``first_samples``: one answer
    already sampled per prompt of ``prompts`` (at the same temperature), used as the first of
    the k, so pass@k costs k - 1 new answers per prompt."""
    rows = graded(prompts, answer_field)
    if not rows:
        return None, []
    firsts = None
    if first_samples is not None:
        index = {id(p): c for p, c in zip(prompts, first_samples)}
        firsts = [index[id(p)] for p in rows]
    comps = engine.generate([p["ids"] for p in rows], SamplingConfig(max_new_tokens, greedy=True))
    greedy, samples = greedy_report(rows, comps, answer_field, difficulty_field)
    report = {"greedy": greedy}
    answers, kinds = [s["answer"] for s in samples], [s["difficulty"] for s in samples]
    if pass_k:
        new = pass_k - (firsts is not None)
        seeds = [seed * 1_000_003 + i * 1024 + j for i in range(len(rows)) for j in range(new)]
        drawn = engine.generate([p["ids"] for p in rows for _ in range(new)],
                                SamplingConfig(max_new_tokens, temperature, top_p, row_seeds=seeds)) if new else []
        sampled = [c for i in range(len(rows))
                   for c in ([firsts[i]] if firsts is not None else []) + drawn[i * new:(i + 1) * new]]
        per = grade([c.text for c in sampled], [a for a in answers for _ in range(pass_k)])
        any_right = {name: [max(v[i * pass_k:(i + 1) * pass_k]) for i in range(len(rows))] for name, v in per.items()}
        report[f"pass@{pass_k}"] = _summarise(any_right, kinds)
        report[f"pass@{pass_k}"]["k"] = pass_k
    return report, samples


def greedy_report(rows: list[dict], comps: list, answer_field: str, difficulty_field: str) -> tuple[dict, list[dict]]:
    """Accuracy of one answer per graded prompt (``rows``: prompts carrying ``answer_field``),
    and each answer with its grades."""
    answers = [p["fields"][answer_field] for p in rows]
    kinds = [str(p["fields"].get(difficulty_field, "all")) for p in rows]
    marks = grade([c.text for c in comps], answers)
    samples = [{"prompt": p["messages"][-1]["content"], "answer": a, "difficulty": kind, "completion": c.text,
                **{name: marks[name][i] for name in marks}}
               for i, (p, a, kind, c) in enumerate(zip(rows, answers, kinds, comps))]
    return _summarise(marks, kinds), samples


def accuracy_change(samples_path) -> dict | None:
    """The first and the last evaluation's greedy answers graded on the same held-out problems
    (``eval_greedy`` records of a run's samples.jsonl): per grader, the paired difference in
    accuracy with its 95 % interval -- the noise a before/after comparison has to beat."""
    import json

    from .scoring.stats import paired_difference

    by_it: dict[int, list[dict]] = {}
    for line in open(samples_path):
        rec = json.loads(line)
        if rec.get("split") == "eval_greedy":
            by_it.setdefault(rec["iteration"], []).append(rec)
    if len(by_it) < 2:
        return None
    first, last = by_it[min(by_it)], by_it[max(by_it)]
    if [r["prompt"] for r in first] != [r["prompt"] for r in last]:
        return None
    out = {name: paired_difference([r[name] for r in first], [r[name] for r in last]) for name in GRADERS}
    return {"from_iteration": min(by_it), "to_iteration": max(by_it), **out}


def flat(report: dict | None) -> dict[str, float]:
    """The headline numbers as flat metric names (``accuracy_lenient``, ``pass@8_strict``...)."""
    out: dict[str, float] = {}
    for mode, r in (report or {}).items():
        prefix = "accuracy" if mode == "greedy" else mode
        for name in GRADERS:
            out[f"{prefix}_{name}"] = r[name]
    return out
