"""scripts/bench_preference.py: arms run one at a time into records, the report is generated
from the records, and an arm with a record is not run again."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).parents[1]
TINY = ["--eval-pairs", "8", "--set", "data.max_train_pairs=12", "data.validation_pairs=4", "train.batch_size=4",
        "train.max_length=64", "train.max_prompt_length=32"]


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_preference", ROOT / "scripts" / "bench_preference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _bench(tmp_path, tiny_model_path, *args):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_preference.py"), "--model", tiny_model_path,
           "--runs", str(tmp_path / "runs"), "--records", str(tmp_path / "records"), "--out", str(tmp_path / "out.json"),
           *args, *TINY]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_arms_are_recorded_reported_and_never_run_twice(tmp_path, tiny_model_path, shared):
    _bench(tmp_path, tiny_model_path, "--only", "screen", "--max-arms", "2")
    records = sorted(p.stem for p in (tmp_path / "records").glob("*.json"))
    assert records == ["screen-ipo", "screen-sigmoid"]  # the full budget's methods first
    rec = json.loads((tmp_path / "records" / "screen-sigmoid.json").read_text())
    assert rec["steps"] == 2 and rec["train_pairs"] == 8 and rec["machine"]["cpu"] and len(rec["eval_per_pair"]["normalized"]) == 8
    assert "data.max_train_pairs=500" in rec["args"]  # 300 to train on + 200 held out as validation
    assert "train.loss_type=sigmoid" in rec["args"] and "train.eval_max_length=0" in rec["args"]
    # the second arm read the reference passes the first made (the same pairs, base and batching)
    ipo = json.loads((tmp_path / "records" / "screen-ipo.json").read_text())
    assert rec["reference_read_from_store"] == {} and set(ipo["reference_read_from_store"]) == {"train", "eval", "validation"}
    assert any((tmp_path / "runs" / "reference-store").glob("*.pt"))
    result = json.loads((tmp_path / "out.json").read_text())
    assert [r["method"] for r in result["screen"]] and len(result["screen"]) == 2 and result["screen_arms"] == 18
    assert (tmp_path / "out.md").is_file() and (tmp_path / "out.png").is_file()
    assert result["decision"]["decided"] is False and result["decision"]["new_default"] is None
    listed = _bench(tmp_path, tiny_model_path, "--only", "screen", "--list")
    todo = listed.split("to run:", 1)[1].strip().split(", ")
    assert "screen-sigmoid" not in todo and "screen-ipo" not in todo and len(todo) == 16 and "screen-kto" in todo
    # a full-budget arm also scores its adapter on the in-family test split (half-a, never trained on)
    _bench(tmp_path, tiny_model_path, "--only", "full", "--max-arms", "1")
    full = json.loads((tmp_path / "records" / "full-sigmoid-b0.05.json").read_text())
    assert len(full["in_family_per_pair"]["normalized"]) == 8 and full["in_family_test"]["pairs"] == 8
    assert full["in_family_test"]["normalized_margin_accuracy"] == sum(full["in_family_per_pair"]["normalized"]) / 8
    # its base pass on those pairs was kept in the study's store, for the next arm to read
    assert full["in_family_test"]["reference_read_from_store"] is False
    # and on harmless-base, reported apart
    assert len(full["harmless_per_pair"]["normalized"]) == 8 and full["harmless_test"]["pairs"] == 8
    # a record made before a test joined its stage gets it from the arm's adapter, the same marks
    bench = _module()
    stripped = {k: v for k, v in full.items() if not k.startswith("harmless")}
    (tmp_path / "records" / "full-sigmoid-b0.05.json").write_text(json.dumps(stripped))
    a = SimpleNamespace(runs=str(tmp_path / "runs"), records=str(tmp_path / "records"), eval_pairs=8)
    assert bench.add_missing_tests(a) == 1 and bench.add_missing_tests(a) == 0
    again = json.loads((tmp_path / "records" / "full-sigmoid-b0.05.json").read_text())
    assert again["harmless_per_pair"] == full["harmless_per_pair"] and again["harmless_test"]["reference_read_from_store"]


def test_the_budget_arms_wait_for_sigmoids_grid_and_take_its_validation_best_beta(tmp_path):
    """Item 3's shapes run sigmoid at the beta its full-budget grid chose on validation (and
    not before that grid has run), each with its own pair count and truncation."""
    bench = _module()
    a = SimpleNamespace(records=str(tmp_path))
    assert bench.budget_arms(a) == {}
    for beta, right in ((0.05, 100), (0.1, 120), (0.3, 110)):
        marks = [1.0] * right + [0.0] * (200 - right)
        (tmp_path / f"full-sigmoid-b{beta}.json").write_text(json.dumps({"validation_per_pair": {"normalized": marks}}))
        if beta == 0.1:
            assert bench.budget_arms(a) == {}  # the grid is not whole yet
    arms = bench.budget_arms(a)
    assert {v["beta"] for v in arms.values()} == {0.1} and len(arms) == 4
    assert arms["budget-560-384"]["pairs"] == 560 and arms["budget-560-384"]["max_prompt_length"] == 192


def test_what_a_stopped_arm_left_is_moved_aside_with_its_files_never_deleted(tmp_path):
    bench = _module()
    folder = tmp_path / "full-ipo-b0.1"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "weights").write_text("kept")
    aside = bench.set_aside(folder)
    assert not folder.exists() and aside.parent == tmp_path and aside.name.startswith("full-ipo-b0.1.stopped-")
    assert (aside / "adapter" / "weights").read_text() == "kept"


def test_finish_by_starts_no_arm_that_would_end_after_it(tmp_path, capsys):
    """The study stops between arms: an arm starts only if its expected minutes end by --finish-by."""
    import time

    bench = _module()
    noon = time.mktime((2026, 12, 5, 12, 0, 0, 0, 0, -1))
    assert bench.time_for_another_arm(noon, "", 23)
    assert bench.time_for_another_arm(noon, "12:23", 23) and not bench.time_for_another_arm(noon, "12:22", 23)
    assert not bench.time_for_another_arm(noon, "11:00", 23)
    for bad in ("1355", "25:00", "13:60", "noon"):
        try:
            bench.clock_time(bad)
        except bench.argparse.ArgumentTypeError as e:
            assert "--finish-by" in str(e) and bad in str(e)
        else:
            raise AssertionError(bad)
    # past the deadline: no arm runs, the report is still written from the records there are
    assert bench.main(["--runs", str(tmp_path / "runs"), "--records", str(tmp_path / "records"),
                       "--out", str(tmp_path / "out.json"), "--finish-by", "00:00"]) == 0
    said = capsys.readouterr().out
    assert "stopping before screen-sigmoid" in said and said.count("stopping before") == 1
    assert not (tmp_path / "runs").exists() and (tmp_path / "out.json").is_file()
    # and without it (argparse runs a string default through the type: None is not)
    assert bench.main(["--records", str(tmp_path / "records"), "--out", str(tmp_path / "again.json"), "--report-only"]) == 0


def test_an_arms_expected_minutes_come_from_its_methods_slowest_record(tmp_path):
    bench = _module()
    a = SimpleNamespace(records=str(tmp_path), arm_minutes=23.0)
    kto = {"stage": "full", "method": "kto"}
    assert bench.expected_minutes(a, kto) == 23.0  # nothing recorded: the floor
    (tmp_path / "full-kto-b0.05.json").write_text(json.dumps({**kto, "wall_seconds": 1937}))  # no arm_seconds: + 2 tests
    assert bench.expected_minutes(a, kto) == (1937 + 2 * 240) / 60
    (tmp_path / "full-kto-b0.1.json").write_text(json.dumps({**kto, "wall_seconds": 1900, "arm_seconds": 2500}))
    assert bench.expected_minutes(a, kto) == 2500 / 60
    assert bench.expected_minutes(a, {"stage": "full", "method": "sigmoid"}) == 23.0  # another method's arms do not count
    assert bench.expected_minutes(a, {"stage": "screen", "method": "kto"}) == 23.0  # nor another stage's


def test_sigmoids_second_seed_comes_first_then_the_three_best_by_validation(tmp_path):
    """Every comparison of the rule pools sigmoid's two seeds: its seed 1 is queued before the
    others, so a study stopped part-way can still decide for the methods whose seed 1 ran."""
    bench = _module()
    a = SimpleNamespace(records=str(tmp_path))
    right = {"sigmoid": 100, "ipo": 130, "robust": 105, "apo_zero": 110, "simpo": 125, "orpo": 90, "kto": 120}
    for m, r in right.items():
        for beta in bench.BETAS:
            marks = [1.0] * (r + (beta == 0.1)) + [0.0] * (200 - r - (beta == 0.1))
            (tmp_path / f"full-{m}-b{beta}.json").write_text(json.dumps({"validation_per_pair": {bench.decision_key(m): marks}}))
    seed1 = [n for n, v in bench.full_arms(a).items() if v["seed"] == 1]
    assert seed1 == ["full-sigmoid-b0.1-seed1", "full-ipo-b0.1-seed1", "full-simpo-b0.1-seed1", "full-kto-b0.1-seed1"]


def test_the_report_applies_the_rule_to_the_methods_whose_two_seeds_have_run(tmp_path):
    """Before every arm has run the rule is not decided, but the report says what it gives for the
    methods with both seeds beside sigmoid's, and which reach the 0.65 target (mean of two seeds)."""
    bench = _module()
    a = SimpleNamespace(records=str(tmp_path / "records"), out=str(tmp_path / "out" / "report.json"))
    (tmp_path / "records").mkdir()
    off = {"sigmoid": 310, "ipo": 350, "simpo": 320, "kto": 315}  # right of 500 off-family pairs, both seeds

    def record(name, method, right_val, right_off):
        key = bench.decision_key(method)
        marks = lambda right, n: [1.0] * right + [0.0] * (n - right)  # noqa: E731 -- pair i right in both arms if i < right
        (tmp_path / "records" / f"{name}.json").write_text(json.dumps({
            "method": method, "stage": "full", "validation_per_pair": {key: marks(right_val, 200)},
            "eval_per_pair": {key: marks(right_off, 500)}, "eval": {}, "train_seconds": 600, "wall_seconds": 1200,
            "machine": {"cpu": "test"}}))

    for i, m in enumerate(bench.FULL_SET):  # the three best by validation: ipo, simpo, kto
        for beta in bench.BETAS:
            record(f"full-{m}-b{beta}", m, {"ipo": 150, "simpo": 140, "kto": 130}.get(m, 100 + i) + (beta == 0.1),
                   off.get(m, 300))
    for m in ("sigmoid", "ipo"):
        record(f"full-{m}-b0.1-seed1", m, 100, off[m])
    result = bench.report(a)
    d = result["decision"]
    assert not d["decided"] and d["new_default"] is None  # other seed-1 arms still wait
    (ipo,) = d["two_seeds_so_far"]
    assert ipo["method"] == "ipo" and ipo["passes_rule"] and abs(ipo["off_family_mean"] - 0.70) < 1e-9
    assert abs(ipo["vs_sigmoid"]["difference"] - 0.08) < 1e-9 and ipo["vs_sigmoid"]["ci95"][0] > 0
    assert d["target_reached_two_seeds"] == ["ipo"]  # sigmoid's 0.62 does not, and one seed never counts
    md = Path(a.out).with_suffix(".md").read_text()
    assert "ipo 0.700, +0.080" in md and "passes" in md and "reached by: ipo" in md


def test_a_shape_that_leads_gets_its_second_seed_and_the_rule_decides_item_3(tmp_path):
    """Item 3 follows the protocol: a budget shape whose seed 0 beats today's 1,000 pairs at
    128/64 (seed 0) off family is queued with seed 1; the rule pools both seeds against sigmoid's
    two and decides once every queued shape has run. A shape that does not lead gets no seed 1."""
    bench = _module()
    a = SimpleNamespace(records=str(tmp_path / "records"), out=str(tmp_path / "out" / "report.json"))
    (tmp_path / "records").mkdir()

    def record(name, right_off, right_val=100):
        marks = lambda right, n: [1.0] * right + [0.0] * (n - right)  # noqa: E731
        (tmp_path / "records" / f"{name}.json").write_text(json.dumps({
            "method": "sigmoid", "stage": "budget" if name.startswith("budget") else "full",
            "validation_per_pair": {"normalized": marks(right_val, 200)}, "eval_per_pair": {"normalized": marks(right_off, 500)},
            "eval": {}, "train_seconds": 600, "wall_seconds": 1200, "machine": {"cpu": "test"},
            "truncation": {"packed_tokens": 160000}}))

    for beta in bench.BETAS:
        record(f"full-sigmoid-b{beta}", 300, 100 + (beta == 0.1))
    record("full-sigmoid-b0.1-seed1", 300)
    record("budget-1205-96", 340)  # leads today's 300
    record("budget-760-192", 290)
    arms = bench.budget_arms(a)
    assert "budget-1205-96-seed1" in arms and arms["budget-1205-96-seed1"]["seed"] == 1
    assert arms["budget-1205-96-seed1"]["pairs"] == 1205 and "budget-760-192-seed1" not in arms
    record("budget-660-256", 300)  # a tie does not lead
    record("budget-560-384", 200)
    assert not bench.report(a)["decision"]["budget_decided"]  # the leader's seed 1 still waits
    record("budget-1205-96-seed1", 340)
    d = bench.report(a)["decision"]
    assert d["budget_decided"] and d["new_shape"]["pairs"] == 1205
    (lead,) = [s for s in d["budget_rule"] if s["passes_rule"]]
    assert lead["vs_today"]["seeds"] == 2 and abs(lead["vs_today"]["difference"] - 0.08) < 1e-9
    md = Path(a.out).with_suffix(".md").read_text()
    assert "new shape: 1205 pairs at 96" in md and "760 at 192 0.580 (1 seed(s))" in md


def test_the_limits_say_how_many_pairs_a_lead_needs_and_whether_validation_found_the_best_beta():
    """Hand-computed: a +0.02 lead with a +-0.03 interval on 1,000 pair-marks needs 1,000 x 1.5^2
    = 2,250; a method whose validation picked a beta that is not the grid's best off family is
    named; ties in a rank correlation take their mean rank."""
    bench = _module()
    kto = {"method": "kto", "beta": 0.05, "off_family": 0.664,
           "vs_sigmoid": {"difference": 0.02, "ci95": [-0.01, 0.05], "n": 1000, "seeds": 2}}
    grid = [{"method": "kto", "seed": 0, "off_family": off, "validation": val, "in_family": 0.5}
            for off, val in ((0.664, 0.56), (0.672, 0.55), (0.674, 0.56))]
    got = bench.limits([kto], grid, winners=[])
    assert got["more_pairs_needed"]["kto"]["pair_marks_needed"] == 2250
    assert got["validation_picked_beta"]["kto"]["is_off_family_best"] is False
    assert bench.limits([kto], grid, winners=[kto])["more_pairs_needed"] == {}  # a passing method needs no more
    assert abs(bench.spearman([1, 1, 2], [1, 2, 3]) - 1.5 / 3 ** 0.5) < 1e-12
    assert bench.spearman([1, 2, 3], [3, 2, 1]) == -1.0 and bench.spearman([1, 1, 1], [1, 2, 3]) is None
