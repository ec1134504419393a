"""scripts/gpu_check.py's CPU form: every job once at tiny size, as the GPU check runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_on_the_cpu_runs_every_job(tmp_path, shared):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in result["jobs"].items() if not v["ran"]}
    assert proc.returncode == 0 and result["all_ran"], failed
    jobs = result["jobs"]
    assert {"dpo", "rm", "ppo_verifier", "ppo_dpo_reward_rm_judge", "eval_pairs", "eval_accuracy",
            "eval_generation", "export_adapter", "export_merged", "ppo_fsdp2_one_process"} <= set(jobs)
    assert jobs["dpo"]["share_of_peak_train"] is not None and result["weights"] == "random"
    assert jobs["ppo_fsdp2_one_process"]["parallelism"] == "fsdp2"  # sharded, on a group of one
    assert all(not v["skew"] for k, v in result["dependencies"].items() if k != "vllm")
    assert not list((ROOT / "results").glob("gpu_check_cpu*.json"))  # wrote where it was told, nothing else


def test_gpu_session_says_how_to_use_it(tmp_path):
    """The device-side script refuses clearly: no subcommand, or `run` before `prepare`."""
    import shutil

    script = tmp_path / "repo" / "scripts" / "gpu_session.sh"
    script.parent.mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_session.sh", script)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: bash scripts/gpu_session.sh prepare | run" in usage.stderr
    early = subprocess.run(["bash", str(script), "run"], capture_output=True, text=True)
    assert early.returncode == 2 and "run 'prepare' first and carry .gpu" in early.stderr
