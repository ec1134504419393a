"""Crash safety on real (tiny-model) runs in subprocesses: SIGKILL mid-run then --resume gives
the uninterrupted run's curve; SIGTERM saves a checkpoint and exits cleanly; NaN steps are
skipped and counted, or stop the run with its last checkpoint intact."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.config import load_config

TIMING_KEYS = ("seconds", "per_s", "runtime", "_time", "samples_per_second", "steps_per_second")


def _cli(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "align.cli", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _curve(records: list[dict]) -> list[tuple]:
    """(step, key, value) for every logged number that is not a timing. transformers' end-of-
    training record (``train_runtime``, ``train_loss``) averages over this process's steps
    only, so it is not part of the curve."""
    out = []
    for r in records:
        if "train_runtime" in r:
            continue
        for k, v in sorted(r.items()):
            if isinstance(v, float) and not any(t in k for t in TIMING_KEYS):
                out.append((r["step"], k, round(v, 6)))
    return out


def _interrupt_and_resume(job_args, out: Path, sig, kill_after_ckpt: int, save_every: int):
    """Run uninterrupted; run again, send ``sig`` once checkpoint ``kill_after_ckpt`` exists,
    resume; return (full run folder, interrupted run folder, exit code, steps logged at kill)."""
    full, part = out / "full", out / "part"
    common = [*job_args, f"run.output_dir={out}", f"run.save_every={save_every}", "run.plot=false"]
    assert _cli([*common, "run.name=full"], out / "full.log").wait() == 0, (out / "full.log").read_text()[-3000:]
    proc = _cli([*common, "run.name=part"], out / "part.log")
    target = part / "checkpoints" / f"step-{kill_after_ckpt}"
    t0 = time.time()
    while not target.exists():
        assert proc.poll() is None, f"run ended before step {kill_after_ckpt}: {(out / 'part.log').read_text()[-3000:]}"
        assert time.time() - t0 < 300, "no checkpoint after 300 s"
        time.sleep(0.01)
    proc.send_signal(sig)
    rc = proc.wait(timeout=300)
    assert not (part / "summary.json").exists(), "the run finished before the signal; test is void"
    logged = [r["step"] for r in _records(part)] if (part / "metrics.jsonl").exists() else []
    resumed = _cli([*common, "run.name=part", "--resume"], out / "resume.log").wait()
    assert resumed == 0, (out / "resume.log").read_text()[-3000:]
    return full, part, rc, logged


def _assert_continues(full: Path, part: Path, save_every: int, logged_at_kill: list[int]) -> None:
    ckpt_steps = []
    log = (part.parent / "resume.log").read_text()
    assert "resuming from" in log
    ckpt_steps.append(int(log.split("resuming from")[1].split("(step ")[1].split(")")[0]))
    # no completed step lost beyond one checkpoint interval
    assert max(logged_at_kill) - ckpt_steps[0] <= save_every
    # the resumed run has every step once, and the same curve as the uninterrupted run
    assert _curve(_records(part)) == _curve(_records(full))
    assert json.loads((part / "summary.json").read_text())["resumed_from"].endswith(f"step-{ckpt_steps[0]}")


def _dpo_args(model):
    return ["dpo", f"model.name={model}", "data.max_train_pairs=24", "data.max_eval_pairs=4",
            "train.batch_size=4", "train.epochs=2", "train.max_length=96", "train.max_prompt_length=48"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_dpo_interrupted_then_resumed_matches_uninterrupted(tmp_path, tiny_model_path, shared, sig):
    full, part, rc, logged = _interrupt_and_resume(_dpo_args(tiny_model_path), tmp_path, sig, 4, 2)
    if sig == signal.SIGTERM:  # clean exit with a checkpoint of the step it was on
        assert rc == 128 + signal.SIGTERM
        assert "stopped by SIGTERM; checkpoint saved" in (tmp_path / "part.log").read_text()
    else:
        assert rc == -signal.SIGKILL
    _assert_continues(full, part, 2, logged)
    steps = [r["step"] for r in _records(part) if "loss" in r]
    assert steps == list(range(1, 13))  # 24 pairs / 4 x 2 epochs, each step once, across the epoch
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-10", "step-12"]  # keep_last 2


def test_rm_killed_then_resumed_matches_uninterrupted(tmp_path, tiny_model_path, shared):
    args = ["rm", f"model.name={tiny_model_path}", "data.max_train_pairs=24", "data.max_eval_pairs=4",
            "train.batch_size=4", "train.epochs=2", "train.max_length=2048"]
    full, part, rc, logged = _interrupt_and_resume(args, tmp_path, signal.SIGKILL, 4, 2)
    assert rc == -signal.SIGKILL
    _assert_continues(full, part, 2, logged)
    assert [r["step"] for r in _records(part) if "loss" in r] == list(range(1, 13))


def _ppo_args(model, prompts):
    return ["ppo", f"model.name={model}", f"data.dataset={prompts}", "data.text_field=prompt",
            "data.first_words=0", "data.template={text}", "data.rows_start=0", "data.rows_stop=0",
            "data.eval_prompts=2", "rollout.max_new_tokens=6", "reward.function=reward.examples:length_target",
            "ppo.iterations=8", "ppo.prompts_per_iteration=2", "ppo.samples_per_prompt=2",
            "ppo.minibatch_size=2", "ppo.eval_every=2", "ppo.kl_target=1"]


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say something about {w}."})
                              for w in ["bread", "films", "Paris", "music", "rain", "tea", "cats", "maps"]))
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_ppo_interrupted_then_resumed_matches_uninterrupted(tmp_path, tiny_model_path, prompts, sig):
    """Samples, rewards, losses and the adaptive KL coefficient after the resume are those of
    the uninterrupted run: weights, optimizer, prompt order, RNG and KL controller all came back."""
    full, part, rc, logged = _interrupt_and_resume(_ppo_args(tiny_model_path, prompts), tmp_path, sig, 4, 2)
    assert rc == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
    _assert_continues(full, part, 2, logged)
    train_steps = [r["step"] for r in _records(part) if "reward_mean" in r]
    assert train_steps == list(range(1, 9))
    samples = [json.loads(line) for line in (part / "samples.jsonl").read_text().splitlines()]
    full_samples = [json.loads(line) for line in (full / "samples.jsonl").read_text().splitlines()]
    assert samples == full_samples


def test_resume_refuses_changed_config_and_missing_checkpoint(tmp_path, tiny_model_path, prompts):
    from align.config import ConfigError
    from align.ppo import run_ppo

    args = [a for a in _ppo_args(tiny_model_path, prompts)[1:] if not a.startswith("ppo.iterations")]
    cfg = load_config("ppo", None, [*args, "ppo.iterations=2", f"run.output_dir={tmp_path}",
                                    "run.name=r", "run.save_every=1", "run.plot=false"])
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        run_ppo(load_config("ppo", None, [*args, f"run.output_dir={tmp_path}", "run.name=r", "run.resume=must"]))
    shutil.rmtree(tmp_path / "r", ignore_errors=True)
    run_ppo(cfg)
    # a finished run is not resumed; an existing run folder is not silently reused
    with pytest.raises(ValueError, match="finished already"):
        run_ppo(load_config("ppo", None, [*args, f"run.output_dir={tmp_path}", "run.name=r", "run.resume=must"]))
    with pytest.raises(ValueError, match="holds an earlier run"):
        run_ppo(load_config("ppo", None, [*args, f"run.output_dir={tmp_path}", "run.name=r"]))
    (tmp_path / "r" / "summary.json").unlink()
    (tmp_path / "r" / "checkpoints" / ".tmp-step-3").mkdir()  # a save killed half-way
    with pytest.raises(ConfigError, match=r"ppo.learning_rate: 0.0005 -> 0.001"):
        run_ppo(load_config("ppo", None, [*args, f"run.output_dir={tmp_path}", "run.name=r",
                                          "run.resume=must", "ppo.learning_rate=1e-3"]))
    # more iterations is a allowed change; the half-written save is never picked, and removed
    summary = run_ppo(load_config("ppo", None, [*args, "ppo.iterations=3", f"run.output_dir={tmp_path}",
                                                "run.name=r", "run.resume=must", "run.plot=false"]))
    assert summary["resumed_from"].endswith("step-2") and summary["iterations"] == 3
    assert not (tmp_path / "r" / "checkpoints" / ".tmp-step-3").exists()


def test_ppo_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_model_path, prompts, monkeypatch):
    import torch

    from align.ppo import losses, run_ppo

    real = losses.policy_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        calls["n"] += 1
        loss, info = real(*a, **k)
        return (loss * float("nan") if calls["n"] in bad else loss), info

    monkeypatch.setattr(losses, "policy_loss", sometimes_nan)
    base = [*_ppo_args(tiny_model_path, prompts)[1:], f"run.output_dir={tmp_path}", "run.plot=false",
            "ppo.iterations=3", "run.save_every=1"]
    bad = {2}
    summary = run_ppo(load_config("ppo", None, [*base, "run.name=skip"]))
    assert summary["nonfinite_steps_skipped"] == 1
    state = torch.load(tmp_path / "skip" / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False)
    assert all(torch.isfinite(w).all() for w in state["trainable"].values())

    calls["n"], bad = 0, set(range(5, 100))  # iteration 1 (4 minibatches) fine, then all NaN
    from align.guards import NonFiniteError

    with pytest.raises(NonFiniteError, match="run.max_nonfinite_steps=2"):
        run_ppo(load_config("ppo", None, [*base, "run.name=stop", "run.max_nonfinite_steps=2"]))
    # the run stopped without saving after the bad steps: the checkpoint of iteration 1 is the last
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()) == ["step-1"]


def test_dpo_nonfinite_gradients_skip_the_update(tmp_path, tiny_model_path, shared, monkeypatch):
    import torch

    from align.dpo import run_dpo
    from align.dpo.trainer import PackedDPOTrainer

    real = PackedDPOTrainer.compute_loss
    calls = {"n": 0}

    def nan_on_second(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        if calls["n"] == 2:
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    monkeypatch.setattr(PackedDPOTrainer, "compute_loss", nan_on_second)
    cfg = load_config("dpo", None, [*_dpo_args(tiny_model_path)[1:], "train.epochs=1",
                                    f"run.output_dir={tmp_path}", "run.name=nan", "run.plot=false"])
    summary = run_dpo(cfg)
    assert summary["nonfinite_steps_skipped"] == 1 and summary["steps"] == 6
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "nan" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # the other steps trained


def test_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM only asks the loop to stop after its step; a second one exits now."""
    script = ("import time\nfrom align.guards import GracefulStop\n"
              "with GracefulStop() as stop:\n"
              "    print('ready', flush=True)\n"
              "    while True:\n"
              "        time.sleep(0.01)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parents[1])
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # still running: the loop decides when to stop
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert "SIGTERM received" in err and "second SIGTERM: exiting now" in err


HANGS_ON_THIRD_CALL = '''
import pathlib, time
calls = 0
def fn(prompts, completions, **info):
    global calls
    calls += 1
    if calls == 3:  # call 1: held-out eval at iteration 0; call 2: iteration 1; 3: iteration 2
        pathlib.Path(__file__).with_name("hanging").write_text("yes")
        time.sleep(600)
    return [float(len(c)) for c in completions]
'''


@pytest.mark.parametrize("signals", [1, 2], ids=["one-ctrl-c", "two-ctrl-c"])
def test_ctrl_c_while_the_reward_function_hangs(tmp_path, tiny_model_path, prompts, signals):
    """The first Ctrl-C stops waiting on the reward function at once (the last checkpoint is
    where to resume); a second one exits at once. Either way the checkpoint is intact."""
    (tmp_path / "hang.py").write_text(HANGS_ON_THIRD_CALL)
    args = [a for a in _ppo_args(tiny_model_path, prompts) if not a.startswith("reward.function")]
    proc = _cli([*args, f"reward.function={tmp_path / 'hang.py'}:fn", f"run.output_dir={tmp_path}",
                 "run.name=h", "run.save_every=1", "run.plot=false"], tmp_path / "h.log")
    t0 = time.time()
    while not (tmp_path / "hanging").exists():
        assert proc.poll() is None, (tmp_path / "h.log").read_text()[-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    t = time.time()
    # 130 from align, or death by the second SIGINT once align's handler is gone (a shell shows 130)
    assert proc.wait(timeout=30) in (128 + signal.SIGINT, -signal.SIGINT)
    assert time.time() - t < 10  # not the reward's 600 s, nor its 300 s timeout
    log = (tmp_path / "h.log").read_text()
    if signals == 1:
        assert "stopped by SIGINT; checkpoint saved to" in log and "step-1" in log
    ckpts = tmp_path / "h" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1"]
    import torch

    state = torch.load(ckpts / "step-1" / "trainer_state.pt", weights_only=False)
    assert state["iteration"] == 1
