"""results/TABLE.md is what scripts/results_table.py makes of the JSON files in results/."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_table_is_generated_from_the_files():
    table = _script()
    assert (ROOT / "results" / "TABLE.md").read_text() == table.render()
    assert table.main(["--check"]) == 0


def test_a_number_in_the_table_comes_from_its_file(tmp_path, monkeypatch):
    import json
    import shutil

    table = _script()
    for name in ("dpo_hh_rlhf_summary.json",):
        shutil.copy2(ROOT / "results" / name, tmp_path / name)
    data = json.loads((tmp_path / "dpo_hh_rlhf_summary.json").read_text())
    data["eval"]["implicit_accuracy"] = 0.777
    (tmp_path / "dpo_hh_rlhf_summary.json").write_text(json.dumps(data))
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    monkeypatch.setattr(table, "TABLE", tmp_path / "TABLE.md")
    assert "| 0.777 |" in table.render() and table.main(["--check"]) == 1


def test_bench_rl_picks_each_sides_rate_on_validation_by_the_rule_fixed_in_advance():
    """The sweep's pick by hand: the highest mean validation accuracy over a run's checkpoints (not
    its last point), the lower rate on a tie; no pick for a side until all its runs finished; old
    result names gain their rate; the held-out ratio counts only each side's chosen rate."""
    spec = importlib.util.spec_from_file_location("bench_rl", ROOT / "scripts" / "bench_rl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def run(side, lr, curve, seed=0, reached=None):
        return {"side": side, "learning_rate": lr, "seed": seed, "seconds_to_target": reached,
                "curve": [(t, acc, 0.0) for t, acc in curve]}

    results = {"a1": run("align", 1e-3, [(30, 0.2), (60, 0.6)]),    # mean 0.40, last 0.6
               "a2": run("align", 5e-4, [(30, 0.5), (60, 0.5)]),    # mean 0.50: the pick
               "t1": run("trl", 5e-4, [(60, 0.3), (120, 0.5)]),     # mean 0.40
               "t2": run("trl", 2e-3, [(60, 0.5), (120, 0.3)])}     # mean 0.40: a tie -> 5e-4
    picks = bench.sweep_picks(results)
    assert {s: p["learning_rate"] for s, p in picks.items()} == {"align": 5e-4, "trl": 5e-4}
    assert picks["align"]["mean_validation_lenient"] == {"0.0005": 0.5, "0.001": 0.4}
    assert "align" not in bench.sweep_picks(results, grid=[5e-4, 1e-3, 2e-3])  # 2e-3 not run for align yet
    results["t2"]["machine"] = {"cpu": "another"}
    assert "trl" not in bench.sweep_picks(results)  # seconds from two machines do not compare
    del results["t2"]["machine"], results["t2"]["curve"]
    assert "trl" not in bench.sweep_picks(results)
    assert set(bench._renamed({"align_s1": run("align", 5e-4, [], seed=1)})) == {"align_lr0.0005_s1"}
    held = {"a": run("align", 5e-4, [], reached=40.0), "b": run("align", 1e-3, [], reached=10.0),
            "t": run("trl", 2e-3, [], reached=160.0)}
    assert bench._task_summary(held, chosen={"align": 5e-4, "trl": 2e-3})["align_time_over_trl_time"] == 0.25
    # a result from another machine, or from before results named theirs, is kept aside and run again
    here = {"cpu": "this one", "cores": 2}
    mixed = {"new": {**run("align", 5e-4, []), "machine": here}, "old": run("trl", 5e-4, []),
             "away": {**run("trl", 1e-3, []), "machine": {"cpu": "AMD", "cores": 2}}}
    kept, aside = bench.on_this_machine(mixed, {"x@y": {}}, here=here)
    assert set(kept) == {"new"} and set(aside) == {"x@y", "old@unrecorded machine", "away@AMD"}
