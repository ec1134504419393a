"""scripts/lora_without_regret.py in its tiny form: the tiny model, two iterations per run, a
two-point grid. Every arm of the study appears in the JSON, and a re-run skips finished runs --
also once their run folders are gone (a new machine), from the records alone."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--heldout", "arithmetic-heldout-100", "--iterations", "2", "--eval-every", "1", "--ranks", "1,full",
        "--lora-lrs", "1e-3,3e-3", "--full-lrs", "1e-4", "--set", "rollout.max_new_tokens=3",
        "--set", "ppo.prompts_per_iteration=2", "--set", "ppo.samples_per_prompt=2", "--set", "ppo.minibatch_size=4",
        "--set", "reward.function=reward.examples:length_target"]


def _study(tmp_path, model, *extra):
    out = subprocess.run([sys.executable, "scripts/lora_without_regret.py", "--runs", str(tmp_path / "runs"),
                          "--out", str(tmp_path / "lwr.json"), "--model", model, *TINY, *extra],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, json.loads((tmp_path / "lwr.json").read_text())


def test_every_arm_runs_is_reported_and_a_rerun_skips_it(tmp_path, tiny_model_path):
    log, result = _study(tmp_path, tiny_model_path)
    # rank 1 at 2 rates (+ one past the edge the best sits at), full at 1; a second seed of each
    # best; placement needs rank 8 (not in this grid): waits; the batch arm of full
    arms = result["arms"]
    assert {n for n in arms if n.startswith("r1-lr")} >= {"r1-lr1e-3", "r1-lr3e-3"} and len(
        [n for n in arms if n.startswith("r1-lr")]) == 3
    assert {"rfull-lr1e-4", "r1-best-seed1", "rfull-best-seed1", "rfull-batch4x"} <= set(arms)
    assert all(arms[n] == "finished" for n in arms if not n.startswith(("attention", "mlp")))
    assert all(arms[n] == "not run" for n in arms if n.startswith(("attention", "mlp")))
    assert set(result["runs"]) == {n for n, s in arms.items() if s == "finished"}
    for name, run in result["runs"].items():
        assert [p["iteration"] for p in run["curve"]] == [1, 2], name  # no iteration-0 evaluation: the base's is shared
        assert run["trainable_params"] > 0 and run["weights_bytes"] > 0 and run["peak_rss_gib"] > 0
        assert (tmp_path / "runs" / name / "run.json").is_file()  # each arm is a normal run folder
    full, r1 = result["runs"]["rfull-lr1e-4"], result["runs"]["r1-lr1e-3"]
    assert full["trainable_params"] > 50 * r1["trainable_params"]  # the whole model vs a rank-1 adapter
    assert result["base"]["n"] == 100 and "rank 1 matches full fine-tuning in RL" in result["claims"]
    assert (tmp_path / "lwr.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")}
    log, again = _study(tmp_path, tiny_model_path)
    assert "lora.r=" not in log  # nothing started
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")} == stamps
    assert again["runs"].keys() == result["runs"].keys()

    # The run folders are lost (the next session's machine): the records carry the study on.
    records = tmp_path / "lwr"
    assert {p.stem for p in records.glob("*.json")} == set(result["runs"]) | {"base"}
    assert all(len(json.loads((records / f"{n}.json").read_text())["answers"]) == 100 for n in result["runs"])
    shutil.rmtree(tmp_path / "runs")
    log, moved = _study(tmp_path, tiny_model_path)
    assert "lora.r=" not in log and moved["runs"] == again["runs"] and moved["claims"] == again["claims"]

    # A record without per-problem answers (made before records kept them) that is a rank's
    # best is run again, its first figures kept beside the new ones; one that is not, is not.
    best, other = moved["best"]["1"], next(n for n in moved["runs"] if n.startswith("r1-lr") and n != moved["best"]["1"])
    for name in (best, other):
        rec = json.loads((records / f"{name}.json").read_text())
        (records / f"{name}.json").write_text(json.dumps({**rec, "answers": None}))
    log, rerun = _study(tmp_path, tiny_model_path)
    started = [line.split(":")[0].strip() for line in log.splitlines() if "lora.r=" in line]
    assert started == [best] and "per-problem answers" in log
    rec = json.loads((records / f"{best}.json").read_text())
    assert len(rec["answers"]) == 100 and rec["earlier"][0]["answers"] is None
    assert rerun["runs"][other]["has_answers"] is False and rerun["runs"][best]["has_answers"] is True


def test_verdicts_against_the_margin_by_hand():
    sys.path.insert(0, str(ROOT))
    from scripts.lora_without_regret import MARGIN, batch_verdict, ten_x_verdict, verdict

    assert MARGIN == 0.04  # written down before the first run
    assert verdict({"ci95": [-0.008, 0.038]}) == "matches"        # inside +-4 points
    assert verdict({"ci95": [-0.046, -0.010]}) == "differs"       # excludes 0 (and leaves the margin)
    assert verdict({"ci95": [0.005, 0.030]}) == "matches"         # inside the margin, though it excludes 0
    assert verdict({"ci95": [-0.050, 0.010]}) == "inconclusive"   # neither
    assert verdict(None).startswith("not paired yet")
    assert ten_x_verdict([30.0, 30.0], 3.0) == ten_x_verdict([10 / 3], 3.0) == "holds within one grid step"
    assert ten_x_verdict([30.0, 100.0], 3.0) == ten_x_verdict([3.0], 3.0) == "does not hold"
    # LoRA's gain from the big batch minus full fine-tuning's
    assert batch_verdict({"ci95": [-0.09, -0.045]}) == "holds"
    assert batch_verdict({"ci95": [0.045, 0.09]}).startswith("does not hold (LoRA gains more)")
    assert batch_verdict({"ci95": [-0.03, 0.02]}).startswith("does not hold at this scale")
    assert batch_verdict({"ci95": [-0.07, 0.01]}) == "inconclusive"
