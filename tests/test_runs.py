"""Run folders: one process at a time (a lock, and a dead holder's lock taken over), nothing
left behind by a run that failed before its first result, plots in a grid, and trackers."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from align.config import load_config
from align.runs import RunDir, RunError, plot_metrics, start_run


def _cfg(tmp_path, *overrides):
    return load_config("dpo", None, [f"run.output_dir={tmp_path}", "run.name=r", *overrides])


def test_second_run_with_the_same_name_is_refused_until_the_first_ends(tmp_path):
    cfg = _cfg(tmp_path)
    with start_run(cfg, "dpo") as first:
        config_before = (first.path / "config.yaml").read_text()
        with pytest.raises(RunError, match=r"in use by process \d+"):
            start_run(_cfg(tmp_path, "train.beta=0.5"), "dpo")
        assert (first.path / "config.yaml").read_text() == config_before  # not overwritten
        first.log({"step": 1, "loss": 0.5})
    # the first run ended: the folder is free, but holds a run, so a fresh run is still refused
    with pytest.raises(RunError, match="holds an earlier run"):
        start_run(_cfg(tmp_path), "dpo")


def test_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    # a process that took the lock and died without releasing it (SIGKILL)
    proc = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, signal\n"
        f"f = open({str(folder / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('process 999 on oldhost'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")])
    proc.wait()
    with start_run(_cfg(tmp_path), "dpo") as run:
        assert "took over a lock left by process 999 on oldhost" in capsys.readouterr().out
        assert f"process {__import__('os').getpid()}" in (run.path / ".lock").read_text()
    assert (folder / ".lock").read_text() == ""  # released cleanly


def test_failed_fresh_run_leaves_nothing_but_a_run_with_results_is_kept(tmp_path):
    with pytest.raises(ValueError, match="bad data"):
        with start_run(_cfg(tmp_path / "out"), "dpo"):
            raise ValueError("bad data")
    assert not (tmp_path / "out").exists()  # neither the run folder nor the output folder it made
    with pytest.raises(ValueError, match="later failure"):
        with start_run(_cfg(tmp_path / "out"), "dpo") as run:
            run.log({"step": 1, "loss": 0.7})
            raise ValueError("later failure")
    assert (tmp_path / "out" / "r" / "metrics.jsonl").is_file()  # an hour of logs is never deleted


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    return struct.unpack(">II", head[16:24])


def test_plots_are_a_grid(tmp_path):
    keys = [f"k{i}" for i in range(6)]
    records = [{"step": s, **{k: s * i for i, k in enumerate(keys)}} for s in range(5)]
    png = plot_metrics(records, keys, tmp_path / "p.png")
    width, height = _png_size(png)
    assert width < 1500 and height > 600, (width, height)  # 3 x 2 panels, not 6 in a row


def test_tensorboard_tracker_gets_the_ppo_metrics(tmp_path, tiny_model_path):
    from align.ppo import run_ppo  # tensorboard itself comes with the dev extra

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say something about {w}."}) for w in "abcdef"))
    cfg = load_config("ppo", None, [
        f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.eval_prompts=2",
        "rollout.max_new_tokens=4", "reward.function=reward.examples:length_target", "ppo.iterations=1",
        "ppo.prompts_per_iteration=2", "ppo.minibatch_size=4", f"run.output_dir={tmp_path}", "run.name=tb",
        "run.report_to=[tensorboard]", "run.plot=false"])
    run_ppo(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert {"reward_mean", "kl_per_answer", "eval/reward_mean"} <= set(events.Tags()["scalars"])


def test_hf_trainers_get_report_to(tmp_path):
    from align.dpo.trainer import dpo_args

    assert dpo_args(_cfg(tmp_path, "run.report_to=[tensorboard]"), str(tmp_path)).report_to == ["tensorboard"]
    assert dpo_args(_cfg(tmp_path), str(tmp_path)).report_to in ([], "none", ["none"])


def test_rundir_without_context_still_writes(tmp_path):
    """Scripts may hold a RunDir without `with`: it works, the lock goes with the process."""
    run = RunDir(_cfg(tmp_path).run, _cfg(tmp_path), "dpo")
    run.log({"step": 1, "x": 1.0})
    assert run.read_metrics() == [{"step": 1, "x": 1.0}]
    run.close()
