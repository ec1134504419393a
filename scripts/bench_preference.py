"""Preference learning off its training family: every DPO-family objective measured with one
yardstick (docs/preference-generalisation.md, written before any run; issue 43).

Each arm is a normal `align dpo` run under ``--runs``; a finished arm leaves a small record in
``--records`` (committed with the results: its settings, machine, minutes, validation and
off-family metrics and per-pair marks, which the paired intervals need), so the study goes on
across sessions and machines although run folders are not kept: an arm with a record is never
run again. One arm at a time, never two (timings compare only on an otherwise idle machine).

    python scripts/bench_preference.py                   # the screen, then the full budget; resumable
    python scripts/bench_preference.py --only screen --max-arms 2
    python scripts/bench_preference.py --report-only     # results/preference_generalisation.{json,md,png}
    python scripts/bench_preference.py --finish-by 13:55 # start no arm that would end after 13:55

The protocol, as the doc fixes it:

- Train on helpful-rejection-sampled (half-b); 200 of those pairs held out as validation (tune
  on these); off-family test: 500 helpful-base pairs, untruncated (``train.eval_max_length=0``).
- Full-budget arms are also scored on the in-family test split (500 helpful-rejection-sampled
  pairs of half-a, never trained on) and on harmless-base (reported apart, never decides).
- Decision metric: length-normalised log-probability margin accuracy against the reference
  (``normalized``), or for a reference-free objective (SimPO, ORPO) the policy's own per-token
  margin (``reference_free_normalized``); implicit accuracy beside it where defined.
- Screen: every loss (TRL's 15, SimPO, ORPO, KTO) at 300 training pairs, beta 0.1, seed 0,
  ranked by validation.
- Full budget: sigmoid, IPO, robust (label smoothing 0.1), APO-zero, SimPO, ORPO, KTO at 1,000
  pairs, beta from {0.05, 0.1, 0.3} chosen on validation per method, then a second seed of the
  three best; differences against sigmoid at the same seed paired on the same pairs (95 %).
- The rule: a method replaces sigmoid as the default only if its off-family mean of two seeds
  beats sigmoid's and the paired interval excludes 0.
- Item 3 (more pairs per minute): sigmoid at its validation-best beta with each BUDGET shape
  (~162k packed tokens), seed 0; a shape that leads today's seed 0 off family gets seed 1 and
  the same rule, pooled against sigmoid's two seeds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRL_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "exo_pair", "sft", "sigmoid_norm")
OBJECTIVES = ("simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
SCREEN_PAIRS, FULL_PAIRS = 300, 1000
VALIDATION = 200  # held out of the loaded training rows: an arm loads its pairs + these
SCREEN_BETA, BETAS = 0.1, (0.05, 0.1, 0.3)
FULL_SET = ("sigmoid", "ipo", "robust", "apo_zero", "simpo", "orpo", "kto")
EXTRA = {"robust": ["train.label_smoothing=0.1"], "exo_pair": ["train.label_smoothing=0.001"]}


def method_overrides(method: str) -> list[str]:
    if method in OBJECTIVES:
        return [f"train.objective={method}"]
    return [f"train.loss_type={method}", *EXTRA.get(method, [])]


def decision_key(method: str) -> str:
    return "reference_free_normalized" if method in REFERENCE_FREE else "normalized"


def common(a) -> list[str]:
    return ["data.train_rows=half-b", f"data.validation_pairs={VALIDATION}", "data.eval_subsets=[helpful-base]",
            f"data.max_eval_pairs={a.eval_pairs}", "train.eval_max_length=0", "run.save_every=0", "run.plot=false",
            "model.dtype=float32", f"train.reference_cache={Path(a.runs) / 'reference-store'}",
            *([f"model.name={a.model}"] if a.model else [])]


def screen_arms(a) -> dict[str, dict]:
    """Every loss, the full budget's methods first (a partial screen then already covers them)."""
    order = [*FULL_SET, *(m for m in (*TRL_LOSSES, *OBJECTIVES) if m not in FULL_SET)]
    return {f"screen-{m}": {"stage": "screen", "method": m, "beta": SCREEN_BETA, "seed": 0, "pairs": SCREEN_PAIRS}
            for m in order}


def full_arms(a) -> dict[str, dict]:
    """Every method of the full set at every beta; then, once a method's grid has run, its
    validation-best beta with seed 1 for sigmoid (first: every comparison of the rule pools its
    two seeds, so a study stopped part-way still decides for the methods whose seed 1 ran) and
    the three best methods by validation."""
    arms = {f"full-{m}-b{b}": {"stage": "full", "method": m, "beta": b, "seed": 0, "pairs": FULL_PAIRS}
            for m in FULL_SET for b in BETAS}
    best = best_per_method(a, arms)
    ranked = sorted(best, key=lambda m: best[m][1], reverse=True)
    for m in (["sigmoid"] if "sigmoid" in best else []) + [m for m in ranked[:3] if m != "sigmoid"]:
        b = arms[best[m][0]]["beta"]
        arms[f"full-{m}-b{b}-seed1"] = {"stage": "full", "method": m, "beta": b, "seed": 1, "pairs": FULL_PAIRS}
    return arms


# Issue 43, item 3: more, shorter or longer pairs at today's packed tokens (~162k: 1,000 pairs at
# 128/64; counts fixed before any run by tokenizing the pairs: 155k, 162k, 161k, 160k). 1,205 is
# every half-b pair but the 200 of validation; deduplicating by prompt is not an arm: no prompt
# repeats among half-b's 1,405 pairs.
BUDGET = ((1205, 96, 48), (760, 192, 96), (660, 256, 128), (560, 384, 192))


# Issue 43's target for the new default: off-family (helpful-base) accuracy, mean of two seeds.
TARGET = 0.65


def budget_arms(a) -> dict[str, dict]:
    """Sigmoid DPO at its validation-best beta (once its grid has run) with each BUDGET shape; a
    shape whose seed 0 leads today's (1,000 pairs at 128/64, seed 0) off family gets seed 1, so the
    rule can pool two seeds against sigmoid's two, as the protocol says ("two seeds where one leads")."""
    best = best_per_method(a, {n: v for n, v in full_arms(a).items() if v["method"] == "sigmoid"})
    if "sigmoid" not in best:
        return {}
    beta = float(best["sigmoid"][0].split("-b")[1])
    arms = {f"budget-{n}-{L}": {"stage": "budget", "method": "sigmoid", "beta": beta, "seed": 0, "pairs": n,
                                "max_length": L, "max_prompt_length": P} for n, L, P in BUDGET}
    today = load_record(a, best["sigmoid"][0])
    for name, arm in list(arms.items()):
        shape = load_record(a, name)
        if today and shape and off_family(shape, "sigmoid") > off_family(today, "sigmoid"):
            arms[f"{name}-seed1"] = {**arm, "seed": 1}
    return arms


def off_family(record: dict, method: str) -> float:
    """An arm's off-family decision metric (mean of its per-pair marks)."""
    marks = record["eval_per_pair"][decision_key(method)]
    return sum(marks) / len(marks)


def best_per_method(a, arms) -> dict[str, tuple[str, float]]:
    """Per method whose whole beta grid has a record: (arm name, validation decision metric) of the best."""
    out = {}
    for m in FULL_SET:
        names = [n for n, v in arms.items() if v["method"] == m and v["seed"] == 0]
        scores = {n: validation_score(a, n, m) for n in names}
        if scores and None not in scores.values():
            n = max(scores, key=scores.get)
            out[m] = (n, scores[n])
    return out


def record_path(a, name: str) -> Path:
    return Path(a.records) / f"{name}.json"


def load_record(a, name: str) -> dict | None:
    p = record_path(a, name)
    return json.loads(p.read_text()) if p.is_file() else None


def validation_score(a, name: str, method: str) -> float | None:
    r = load_record(a, name)
    if r is None:
        return None
    marks = r["validation_per_pair"][decision_key(method)]
    return sum(marks) / len(marks)


def set_aside(folder: Path) -> Path:
    """Move what a stopped arm or test left beside itself, time-stamped: kept, never deleted or reused."""
    aside = folder.with_name(f"{folder.name}.stopped-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(aside)
    return aside


def clock_time(text: str) -> tuple[int, int]:
    """HH:MM as (hours, minutes); an argparse type, so a bad --finish-by is named at once."""
    try:
        hours, minutes = (int(x) for x in text.split(":"))
        if 0 <= hours < 24 and 0 <= minutes < 60:
            return hours, minutes
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--finish-by wants a local time as HH:MM (e.g. 13:55), not {text!r}")


def time_for_another_arm(now: float, finish_by: str, arm_minutes: float) -> bool:
    """Whether an arm started at ``now`` (epoch seconds) ends by ``finish_by`` (HH:MM, local time,
    today). The study stops between arms, never inside one: a cut arm is lost work."""
    if not finish_by:
        return True
    hours, minutes = clock_time(finish_by)
    day = time.localtime(now)
    deadline = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, hours, minutes, 0, 0, 0, -1))
    return now + arm_minutes * 60 <= deadline


def expected_minutes(a, arm: dict) -> float:
    """What an arm should take: the slowest recorded arm of its method and stage (a KTO arm trains
    on twice the rows of a paired one), never less than --arm-minutes. A record made before
    ``arm_seconds`` was kept lacks its held-out tests' time: 4 min a test is added (what a 500-pair
    untruncated test took on the 2-core Xeon, from the records' start and end times)."""
    seen = []
    for p in Path(a.records).glob("*.json"):
        r = json.loads(p.read_text())
        if r.get("method") == arm["method"] and r.get("stage") == arm["stage"]:
            seen.append(r.get("arm_seconds") or r["wall_seconds"] + 240 * len(TESTS_OF_STAGE[arm["stage"]]))
    return max([a.arm_minutes, *(s / 60 for s in seen)])


def run_arm(a, name: str, arm: dict) -> dict:
    from align.runs import machine_state

    out = Path(a.runs)
    args = ["dpo", *common(a), *method_overrides(arm["method"]), f"train.beta={arm['beta']}", f"run.seed={arm['seed']}",
            f"data.max_train_pairs={arm['pairs'] + VALIDATION}", f"run.output_dir={out}", f"run.name={name}",
            *([f"train.max_length={arm['max_length']}", f"train.max_prompt_length={arm['max_prompt_length']}"]
              if "max_length" in arm else []), *a.set]
    folder = out / name
    if folder.exists():  # an arm cut short earlier (no record): run again
        aside = set_aside(folder)
        print(f"{folder} had no record (stopped mid-way): moved to {aside}; running the arm again", flush=True)
    print(f"== {name}: align {' '.join(args)}", flush=True)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{name}.log"
    rc = subprocess.call([sys.executable, "-m", "align.cli", *args], cwd=ROOT, stdout=open(log, "w"),
                         stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"{name}: exit {rc}; see {log}:\n{log.read_text()[-2000:]}")
    wall = round(time.time() - t0, 1)  # the `align dpo` run alone (the held-out tests come after it)
    tests = {t: adapter_test(a, folder, t) for t in TESTS_OF_STAGE[arm["stage"]]}
    summary = json.loads((folder / "summary.json").read_text())
    # reference passes another arm already made (same base, pairs, batching) are read from the
    # study's store: what computing them took is kept, so a wall time can be said both ways
    store = json.loads((folder / "run.json").read_text()).get("reference_cache", {})
    read = {split: v["computed_seconds"] for split, v in store.items() if v.get("hit")}
    record = {**arm, "name": name, "args": args, "machine": machine_state(), "wall_seconds": wall,
              "train_seconds": summary["train_seconds"], "steps": summary["steps"], "train_pairs": summary["train_pairs"],
              "validation": summary.get("validation"), "eval": summary.get("eval"),
              "validation_per_pair": json.loads((folder / "validation_per_pair.json").read_text()),
              "eval_per_pair": json.loads((folder / "eval_per_pair.json").read_text()),
              "reference_read_from_store": read, "truncation": summary.get("truncation"),
              "arm_seconds": round(time.time() - t0, 1),  # the run and its held-out tests
              "recorded": time.strftime("%Y-%m-%d %H:%M")}
    for t, got in tests.items():
        record.update({f"{t}_test": got["metrics"], f"{t}_per_pair": got["per_pair"]})
    record_path(a, name).parent.mkdir(parents=True, exist_ok=True)
    record_path(a, name).write_text(json.dumps(record) + "\n")
    return record


# Held-out tests of a trained adapter by `align eval`, beside the off-family score its run makes:
# in family = 500 helpful-rejection-sampled pairs of the half the study never trains on (half-a);
# harmless = 500 harmless-base pairs, a different objective, reported apart (never decides).
# Both untruncated; the base's scores come from the study's store after the first arm.
TESTS = {"in_family": ("helpful-rejection-sampled", "half-a"), "harmless": ("harmless-base", "all")}
TESTS_OF_STAGE = {"screen": (), "full": ("in_family", "harmless"), "budget": ("in_family",)}


def adapter_test(a, folder: Path, test: str) -> dict:
    """The arm's adapter scored on one of TESTS: its metrics and per-pair marks."""
    subset, rows = TESTS[test]
    out = folder / test.replace("_", "-")
    if out.exists():  # a test cut short earlier (its record lacks it)
        set_aside(out)
    args = ["eval", str(folder), "--data", "Anthropic/hh-rlhf", "--subsets", subset, "--rows", rows,
            "--pairs", str(a.eval_pairs), "--out", str(out), "--dtype", "float32",
            "--reference-cache", str(Path(a.runs) / "reference-store")]
    log = folder.with_name(f"{folder.name}.{test.replace('_', '-')}.log")
    rc = subprocess.call([sys.executable, "-m", "align.cli", *args], cwd=ROOT, stdout=open(log, "w"),
                         stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"{folder.name} {test} test: exit {rc}; see {log}:\n{log.read_text()[-2000:]}")
    prefs = json.loads((out / "eval.json").read_text())["preferences"]
    (name, metrics), = ((k, v) for k, v in prefs["table"].items() if k != "base")
    return {"metrics": {**metrics, "pairs": prefs["pairs"], "seconds": prefs["seconds"],
                        "reference_read_from_store": prefs["reference_cache"].get("hit", False)},
            "per_pair": json.loads((out / "preferences_per_pair.json").read_text())[name]}


def add_missing_tests(a) -> int:
    """Records made before a test joined their stage get it now, from the arm's adapter where its
    run folder is still here (records travel between machines; run folders do not)."""
    added = 0
    for name, arm in {**full_arms(a), **budget_arms(a)}.items():
        r = load_record(a, name)
        folder = Path(a.runs) / name
        missing = [t for t in TESTS_OF_STAGE[arm["stage"]] if r is not None and f"{t}_per_pair" not in r]
        if not missing or not (folder / "adapter").is_dir():
            continue
        for t in missing:
            print(f"== {name}: {t} test (added to its record)", flush=True)
            got = adapter_test(a, folder, t)
            r.update({f"{t}_test": got["metrics"], f"{t}_per_pair": got["per_pair"]})
            record_path(a, name).write_text(json.dumps(r) + "\n")
            added += 1
    return added


def test_of(record: dict, key: str, test: str) -> dict:
    """A held-out test's decision metric and interval, where the arm has that test."""
    from align.scoring.stats import mean_ci95

    marks = (record.get(f"{test}_per_pair") or {}).get(key)
    if not marks:
        return {}
    m, lo, hi = mean_ci95(marks)
    return {test: m, f"{test}_ci95": [lo, hi]}


def report(a) -> dict:
    """The results from whatever has a record: the screen ranked by validation; the full budget
    per method (validation-best beta), off-family accuracy with the paired interval against
    sigmoid at the same seed; the rule applied where both seeds have run."""
    from align.scoring.stats import mean_ci95, paired_difference

    def row(name, arm):
        r = load_record(a, name)
        if r is None:
            return None
        key = decision_key(arm["method"])
        v, e = r["validation_per_pair"][key], r["eval_per_pair"][key]
        return {"arm": name, "method": arm["method"], "beta": arm["beta"], "seed": arm["seed"],
                "validation": sum(v) / len(v), "off_family": sum(e) / len(e), "off_family_ci95": list(mean_ci95(e)[1:]),
                "off_family_implicit": (r["eval"] or {}).get("implicit_accuracy") if arm["method"] not in REFERENCE_FREE else None,
                "train_minutes": round(r["train_seconds"] / 60, 2), "wall_minutes": round(r["wall_seconds"] / 60, 1),
                # the arm as if it had computed every reference pass itself (a first run's wall time)
                "wall_minutes_computing_reference": round(
                    (r["wall_seconds"] + sum(r.get("reference_read_from_store", {}).values())) / 60, 1),
                "cpu": r["machine"].get("cpu"), **test_of(r, key, "in_family"), **test_of(r, key, "harmless")}

    screen = [x for n, arm in screen_arms(a).items() if (x := row(n, arm))]
    screen.sort(key=lambda x: x["validation"], reverse=True)
    sig_screen = load_record(a, "screen-sigmoid")
    for x in screen:  # off family against sigmoid on the same pairs (one seed: a screen, not the rule)
        if sig_screen and x["method"] != "sigmoid":
            x["off_family_vs_sigmoid"] = paired_difference(sig_screen["eval_per_pair"]["normalized"],
                                                           load_record(a, x["arm"])["eval_per_pair"][decision_key(x["method"])])
    arms = full_arms(a)
    best = best_per_method(a, arms)
    full = []
    for m, (n, _) in best.items():
        x = row(n, arms[n])
        seed1 = f"{n}-seed1"
        x["seed1"] = row(seed1, {**arms[n], "seed": 1}) if seed1 in arms else None
        offs = [x["off_family"]] + ([x["seed1"]["off_family"]] if x["seed1"] else [])
        x["off_family_mean"], x["seeds"] = sum(offs) / len(offs), len(offs)
        full.append(x)
    sig = best.get("sigmoid")
    base = {0: load_record(a, sig[0]), 1: load_record(a, f"{sig[0]}-seed1")} if sig else {}
    for x in full:
        if x["method"] == "sigmoid" or not base.get(0):
            continue
        pooled_a, pooled_b, seeds = [], [], 0
        for seed, name in ((0, x["arm"]), *(((1, x["seed1"]["arm"]),) if x["seed1"] else ())):
            mine, theirs = load_record(a, name), base.get(seed)
            if mine and theirs:  # the same pairs, the same seed: sigmoid's marks against this method's
                pooled_a += theirs["eval_per_pair"]["normalized"]
                pooled_b += mine["eval_per_pair"][decision_key(x["method"])]
                seeds += 1
        x["vs_sigmoid"] = {**paired_difference(pooled_a, pooled_b), "seeds": seeds}
    grid = [x for n, arm in arms.items() if (x := row(n, arm))]  # every full-budget arm with a record
    budget, shapes = [], {}
    b_arms = budget_arms(a)
    for n, arm in b_arms.items():  # item 3, against sigmoid's 1,000 pairs at 128/64, same beta and seed
        x = row(n, arm)
        if x and base.get(arm["seed"]):
            r = load_record(a, n)
            today = base[arm["seed"]]["eval_per_pair"]["normalized"]
            x.update(pairs=arm["pairs"], max_length=arm["max_length"], packed_tokens=r["truncation"]["packed_tokens"],
                     vs_today=paired_difference(today, r["eval_per_pair"]["normalized"]))
            budget.append(x)
            s = shapes.setdefault((arm["pairs"], arm["max_length"]), {"today": [], "shape": [], "offs": []})
            s["today"] += today
            s["shape"] += r["eval_per_pair"]["normalized"]
            s["offs"].append(x["off_family"])
    budget_rule = []
    for (pairs, length), s in shapes.items():  # the same rule: two seeds pooled against today's two
        vs = {**paired_difference(s["today"], s["shape"]), "seeds": len(s["offs"])}
        budget_rule.append({"pairs": pairs, "max_length": length, "off_family_mean": sum(s["offs"]) / len(s["offs"]),
                            "vs_today": vs, "passes_rule": vs["seeds"] == 2 and vs["difference"] > 0 and vs["ci95"][0] > 0})
    two_seeds = [x for x in full if x.get("vs_sigmoid", {}).get("seeds") == 2]
    winners = [x for x in two_seeds if x["vs_sigmoid"]["difference"] > 0 and x["vs_sigmoid"]["ci95"][0] > 0]
    everything = len(best) == len(FULL_SET) and all(load_record(a, n) is not None for n in arms)
    shapes_done = bool(b_arms) and all(load_record(a, n) is not None for n in b_arms)
    passing = [s for s in budget_rule if s["passes_rule"]]
    decision = {"rule": "replace sigmoid if the off-family mean of two seeds beats it and the paired 95 % interval "
                        "excludes 0 (the highest such mean wins)",
                "decided": everything,
                "new_default": max(winners, key=lambda x: x["vs_sigmoid"]["difference"])["method"]
                if everything and winners else None,
                # the rule applied to the methods whose two seeds have run (and sigmoid's): not yet the
                # decision while other arms wait, but what it says so far
                "two_seeds_so_far": [{"method": x["method"], "off_family_mean": x["off_family_mean"],
                                      "vs_sigmoid": x["vs_sigmoid"], "passes_rule": any(x is w for w in winners)} for x in two_seeds],
                # item 3: a shape replaces today's 1,000 pairs at 128/64 by the same rule (seed 1 runs
                # only where seed 0 leads; a shape with one seed has not led and does not pass)
                "budget_decided": shapes_done,
                "budget_rule": budget_rule,
                "new_shape": max(passing, key=lambda s: s["vs_today"]["difference"]) if shapes_done and passing else None,
                "target": TARGET,
                "target_reached_two_seeds": [x["method"] for x in full if x["seeds"] == 2 and x["off_family_mean"] >= TARGET]}
    result = {"command": "python scripts/bench_preference.py", "protocol": "docs/preference-generalisation.md",
              "screen": screen, "screen_arms": len(screen_arms(a)), "full": full, "grid": grid, "budget": budget,
              "limits": limits(full, grid, winners),
              "full_arms_recorded":
              sum(load_record(a, n) is not None for n in arms), "full_arms": len(arms), "decision": decision}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, path.with_suffix(".md"))
    plot(result, path.with_suffix(".png"))
    return result


def limits(full: list[dict], grid: list[dict], winners: list[dict]) -> dict:
    """What the grid says limits the study, from its own records: how many paired pair-marks the
    interval would need before a leading method's difference excluded 0 (half-width ~ 1/sqrt(n), at
    the measured difference and spread), whether validation picked each method's off-family-best
    beta, and how well validation and the in-family test rank the arms as off family does."""
    needed = {}
    for x in full:
        vs = x.get("vs_sigmoid")
        if vs and vs["seeds"] == 2 and vs["difference"] > 0 and not any(x is w for w in winners):
            half = (vs["ci95"][1] - vs["ci95"][0]) / 2
            needed[x["method"]] = {"difference": vs["difference"], "pair_marks": vs["n"],
                                   "pair_marks_needed": round(vs["n"] * (half / vs["difference"]) ** 2)}
    seed0 = [x for x in grid if x["seed"] == 0]
    picked = {}
    for x in full:  # ties on off family count as the best
        offs = [y["off_family"] for y in seed0 if y["method"] == x["method"]]
        picked[x["method"]] = {"beta": x["beta"], "off_family": x["off_family"], "grid_off_family_max": max(offs),
                               "grid_off_family_min": min(offs), "is_off_family_best": x["off_family"] >= max(offs)}
    both = [x for x in seed0 if "in_family" in x]
    return {"more_pairs_needed": needed, "validation_picked_beta": picked,
            "spearman_validation_vs_off_family": spearman([x["validation"] for x in seed0], [x["off_family"] for x in seed0]),
            "spearman_in_family_test_vs_off_family": spearman([x["in_family"] for x in both], [x["off_family"] for x in both]),
            "arms": len(seed0)}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation (ties take their mean rank); None under three items or with no spread."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r, i = [0.0] * len(v), 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    sa, sb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb)) / (sa * sb) ** 0.5 if sa and sb else None


def _acc(x: dict, key: str) -> str:
    """``0.612 [0.569, 0.655]``: a row's accuracy and its 95 % interval, or ``-``."""
    return f"{x[key]:.3f} [{x[key + '_ci95'][0]:.3f}, {x[key + '_ci95'][1]:.3f}]" if key in x else "-"


def _diff(d: dict | None) -> str:
    return f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "-"


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Preference objectives off their training family (generated by scripts/bench_preference.py)", "",
             f"Screen: {len(result['screen'])} of {result['screen_arms']} arms recorded; full budget: "
             f"{result['full_arms_recorded']} of {result['full_arms']}.", "",
             "## Screen (300 pairs, beta 0.1, seed 0), ranked by validation", "",
             "Decision metric: length-normalised margin accuracy against the reference (the policy's own per-token "
             "margin for SimPO/ORPO); validation = 200 held-out pairs of the training family, off-family = "
             "helpful-base, untruncated. Arm wall time includes the held-out scoring; reference passes that an "
             "earlier arm had made on the same pairs are read from the study's store (`train.reference_cache`), "
             "and the last column adds what computing them took (a lone run's wall time).", "",
             "| method | validation | off-family [95 %] | off-family - sigmoid (paired) | implicit (off-family) | train min "
             "| arm wall min | the same, reference computed | CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in result["screen"]:
        imp = f"{x['off_family_implicit']:.3f}" if x["off_family_implicit"] is not None else "-"
        lines.append(f"| {x['method']} | {x['validation']:.3f} | {_acc(x, 'off_family')} | {_diff(x.get('off_family_vs_sigmoid'))} | {imp} "
                     f"| {x['train_minutes']} | {x['wall_minutes']} | {x['wall_minutes_computing_reference']} | {x['cpu']} |")
    lines += ["", "## Full budget (1,000 pairs, validation-best beta)", "",
              "Harmless-base (a different objective: which answer is less harmful) is reported apart and never decides.", "",
              "Ties on validation go to the first beta of the grid (the smallest).", "",
              "| method | beta | in-family test seed 0 [95 %] | off-family seed 0 [95 %] | seed 1 | mean (seeds) "
              "| vs sigmoid (paired, pooled seeds) | harmless-base seed 0 [95 %] | train min | arm wall min, reference computed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for x in result["full"]:
        s1 = f"{x['seed1']['off_family']:.3f}" if x.get("seed1") else "-"
        vs = x.get("vs_sigmoid")
        vs = f"{_diff(vs)} ({vs['seeds']} seed(s))" if vs else "-"
        lines.append(f"| {x['method']} | {x['beta']} | {_acc(x, 'in_family')} | {_acc(x, 'off_family')} | {s1} "
                     f"| {x['off_family_mean']:.3f} ({x['seeds']}) | {vs} "
                     f"| {_acc(x, 'harmless')} | {x['train_minutes']} | {x['wall_minutes_computing_reference']} |")
    lines += ["", "Every full-budget arm recorded so far (the beta grid; seed 1 where run):", "",
              "| arm | validation | in-family test [95 %] | off-family [95 %] | harmless-base [95 %] | train min "
              "| arm wall min, reference computed |", "|---|---|---|---|---|---|---|"]
    for x in result["grid"]:
        lines.append(f"| {x['arm']} | {x['validation']:.3f} | {_acc(x, 'in_family')} | {_acc(x, 'off_family')} "
                     f"| {_acc(x, 'harmless')} | {x['train_minutes']} | {x['wall_minutes_computing_reference']} |")
    lines += ["", "## More pairs per minute (sigmoid, its validation-best beta; ~162k packed tokens each)", "",
              "Validation is truncated as each arm trains; off-family and in-family test pairs are untruncated. "
              "Each shape is compared with sigmoid's 1,000 pairs at 128/64 of the same seed; seed 1 runs only for a "
              "shape whose seed 0 leads.", "",
              "| pairs | max length (prompt) | seed | packed tokens | validation | in-family test [95 %] | off-family [95 %] "
              "| vs 1,000 at 128/64 (paired) | train min | arm wall min, reference computed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for x in result["budget"]:
        lines.append(f"| {x['pairs']} | {x['max_length']} ({x['max_length'] // 2}) | {x['seed']} | {x['packed_tokens']:,} "
                     f"| {x['validation']:.3f} | {_acc(x, 'in_family')} | {_acc(x, 'off_family')} | {_diff(x['vs_today'])} "
                     f"| {x['train_minutes']} | {x['wall_minutes_computing_reference']} |")
    d = result["decision"]
    if d["budget_rule"]:
        lines += ["", f"Item 3 by the same rule (decided: {d['budget_decided']}; new shape: "
                  + (f"{d['new_shape']['pairs']} pairs at {d['new_shape']['max_length']}" if d["new_shape"]
                     else "none (1,000 pairs at 128/64 stay)") + "): " + "; ".join(
                      f"{s['pairs']} at {s['max_length']} {s['off_family_mean']:.3f} ({s['vs_today']['seeds']} seed(s)), "
                      f"{_diff(s['vs_today'])}, {'passes' if s['passes_rule'] else 'does not pass'}"
                      for s in d["budget_rule"]) + "."]
    lines += ["", f"Rule: {d['rule']}. Decided: {d['decided']}; new default: {d['new_default'] or 'none (sigmoid stays)'}."]
    if d["two_seeds_so_far"]:
        lines += ["", ("The rule on" if d["decided"] else "So far,") + " the methods whose two seeds have run (against sigmoid's two): " + "; ".join(
            f"{t['method']} {t['off_family_mean']:.3f}, {_diff(t['vs_sigmoid'])}, "
            f"{'passes' if t['passes_rule'] else 'does not pass'}" for t in d["two_seeds_so_far"]) + "."]
    reached = ", ".join(d["target_reached_two_seeds"]) or "none so far"
    lines += ["", f"Target (issue 43): off-family >= {d['target']}, mean of two seeds -- reached by: {reached}."]
    lim = result["limits"]
    lines += ["", "## What limits it (computed from the records)", ""]
    for m, v in lim["more_pairs_needed"].items():
        lines.append(f"- {m}: {v['difference']:+.3f} against sigmoid on {v['pair_marks']:,} paired pair-marks; at this "
                     f"difference and spread the interval would exclude 0 from ~{v['pair_marks_needed']:,} "
                     f"(~{-(-v['pair_marks_needed'] // 2):,} pairs a seed).")
    missed = [f"{m} (beta {v['beta']}: {v['off_family']:.3f}; the grid's off-family range "
              f"{v['grid_off_family_min']:.3f}-{v['grid_off_family_max']:.3f})"
              for m, v in lim["validation_picked_beta"].items() if not v["is_off_family_best"]]
    lines.append(f"- Validation (200 in-family pairs) picked the off-family-best beta for "
                 f"{len(lim['validation_picked_beta']) - len(missed)} of {len(lim['validation_picked_beta'])} methods; "
                 f"not for {', '.join(missed) or 'none'}.")
    rho = lambda v: f"{v:+.2f}" if v is not None else "-"  # noqa: E731
    lines.append(f"- Rank correlation with off family over the {lim['arms']} seed-0 full-budget arms: validation "
                 f"{rho(lim['spearman_validation_vs_off_family'])}, in-family test "
                 f"{rho(lim['spearman_in_family_test_vs_off_family'])}.")
    path.write_text("\n".join(lines) + "\n")


def _bars(ax, rows: list[dict], left: list[float], left_label: str, right_label: str) -> None:
    """Two bars per row: ``left`` (an in-family figure) and off family with its 95 % interval."""
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], left, 0.4, label=left_label)
    ax.bar([x + 0.2 for x in xs], [r["off_family"] for r in rows], 0.4, label=right_label,
           yerr=[[r["off_family"] - r["off_family_ci95"][0] for r in rows],
                 [r["off_family_ci95"][1] - r["off_family"] for r in rows]])


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["screen"]
    fig, (ax, ax_full, ax_shape) = plt.subplots(1, 3, figsize=(16, 3.8), gridspec_kw={"width_ratios": [3, 2, 1.4]})
    if rows:
        xs = range(len(rows))
        _bars(ax, rows, [r["validation"] for r in rows], "validation (in family)", "helpful-base (off family)")
        ax.set_xticks(list(xs), [r["method"] for r in rows], rotation=60, fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    ax.set_ylabel("decision metric (normalised margin acc.)")
    ax.set_title(f"screen: {len(rows)} of {result['screen_arms']} arms")
    full = result["full"]  # in family (test, seed 0) against off family (seed 0 with its interval; seed 1 as a dot)
    if full:
        xs = range(len(full))
        _bars(ax_full, full, [r.get("in_family", float("nan")) for r in full], "in-family test", "helpful-base (off family)")
        seed1 = [(x, r["seed1"]["off_family"]) for x, r in zip(xs, full) if r.get("seed1")]
        if seed1:
            ax_full.plot([x + 0.2 for x, _ in seed1], [v for _, v in seed1], "k.", label="off family, seed 1")
        ax_full.axhline(TARGET, color="red", lw=0.6, ls="--", label=f"target {TARGET}")
        ax_full.set_xticks(list(xs), [f"{r['method']} b{r['beta']}" for r in full], rotation=45, fontsize=7)
        ax_full.set_ylim(0.3, 0.82)
        ax_full.legend(fontsize=6, ncol=2, loc="upper left")
    ax_full.set_title(f"full budget (1,000 pairs): {result['full_arms_recorded']} of {result['full_arms']} arms")
    shapes = [r for r in result["budget"] if r["seed"] == 0]  # item 3: seed 0 of each shape, today's as a line
    if shapes:
        xs = range(len(shapes))
        _bars(ax_shape, shapes, [r.get("in_family", float("nan")) for r in shapes], "in-family test", "off family")
        today = next((r for r in full if r["method"] == "sigmoid"), None)
        if today:
            ax_shape.axhline(today["off_family"], color="k", lw=0.6, ls=":", label="1,000 at 128, off family")
        ax_shape.set_xticks(list(xs), [f"{r['pairs']} at {r['max_length']}" for r in shapes], rotation=45, fontsize=7)
        ax_shape.set_ylim(0.3, 0.82)
        ax_shape.legend(fontsize=6, loc="upper left")
    ax_shape.set_title(f"sigmoid, ~162k tokens: {len(shapes)} of {len(BUDGET)} shapes")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "preference"))
    ap.add_argument("--records", default=str(ROOT / "results" / "preference" / "records"))
    ap.add_argument("--out", default=str(ROOT / "results" / "preference_generalisation.json"))
    ap.add_argument("--only", choices=["screen", "full", "budget"])
    ap.add_argument("--max-arms", type=int, default=0, help="stop after this many new arms (0 = all)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--finish-by", default=None, metavar="HH:MM", type=lambda t: clock_time(t) and t,
                    help="start no arm that would end after this local time today (then write the report)")
    ap.add_argument("--arm-minutes", type=float, default=23.0,
                    help="the least one arm is expected to take, for --finish-by; the slowest recorded arm of "
                         "the same method and stage counts where longer (a full-budget arm: ~17-22 min on a "
                         "2-core CPU, KTO ~40, tests included)")
    ap.add_argument("--list", action="store_true", help="print the arms and whether each has a record")
    ap.add_argument("--model", default="", help="model.name for every arm (default: the config's)")
    ap.add_argument("--eval-pairs", type=int, default=500)
    ap.add_argument("--set", nargs="*", default=[], help="more key=value overrides for every arm (tests)")
    a = ap.parse_args(argv)
    done, out_of_time = 0, False
    stages = {"screen": screen_arms, "full": full_arms, "budget": budget_arms}
    for stage in stages:
        if a.report_only or out_of_time or (a.only and a.only != stage):
            continue
        if stage == "full" and not a.list:
            add_missing_tests(a)
        while True:  # the full stage's arms grow as the beta grids finish
            todo = {n: v for n, v in stages[stage](a).items()
                    if load_record(a, n) is None}
            if a.list:
                print(stage, "to run:", ", ".join(todo) or "none")
                break
            if not todo or (a.max_arms and done >= a.max_arms):
                break
            name, arm = next(iter(todo.items()))
            minutes = expected_minutes(a, arm)
            if not time_for_another_arm(time.time(), a.finish_by, minutes):
                print(f"stopping before {name}: it would not end by {a.finish_by} ({minutes:.0f} min expected)",
                      flush=True)
                out_of_time = True
                break
            run_arm(a, name, arm)
            done += 1
    if not a.list:
        result = report(a)
        print(f"wrote {a.out} (+ .md, .png): screen {len(result['screen'])}/{result['screen_arms']}, "
              f"full {result['full_arms_recorded']}/{result['full_arms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
