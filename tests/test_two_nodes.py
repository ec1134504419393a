"""Two machines, simulated on loopback: `torchrun --nnodes 2 --nproc-per-node 2` (c10d
rendezvous on 127.0.0.1, gloo), 4 processes in all, compute what one process computes with the
same global batch -- DPO, RM and PPO -- to 1e-4 (issue 42)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(args: list[str], log: Path) -> None:
    rc = subprocess.call([sys.executable, "-m", "align.cli", *args, "model.dtype=float32"], cwd=ROOT,
                         stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=600)
    assert rc == 0, log.read_text()[-4000:]


def two_nodes(args: list[str], logs: Path, port: int | None = None) -> list[subprocess.Popen]:
    """Both 'machines' of `torchrun --nnodes 2 --nproc-per-node 2`, started together."""
    port = port or _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"align-{port}", "-m", "align.cli", *args, "model.dtype=float32"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=open(logs / f"node{node}.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: children first found, then theirs)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _wait(procs, logs: Path) -> None:
    for node, p in enumerate(procs):
        rc = p.wait(timeout=600)
        assert rc == 0, (logs / f"node{node}.log").read_text()[-4000:]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same(one: Path, two: Path, keys, steps=None) -> None:
    a_all, b_all = _records(one), _records(two)
    for key in keys:
        a = {r["step"]: r[key] for r in a_all if r.get(key) is not None}
        b = {r["step"]: r[key] for r in b_all if r.get(key) is not None}
        assert a and sorted(a) == sorted(b), (key, a, b)
        if steps is not None:
            assert len(a) == steps, (key, a)
        assert all(abs(a[s] - b[s]) < 1e-4 * max(1.0, abs(a[s])) for s in a), (key, a, b)


def _pairs_job(job: str, tiny_model_path, tmp_path) -> list[str]:
    return [job, f"model.name={tiny_model_path}", "data.max_train_pairs=16", "data.max_eval_pairs=8",
            "train.max_length=64", "train.max_prompt_length=32", f"run.output_dir={tmp_path}", "run.plot=false",
            "run.save_every=0"]


@pytest.mark.parametrize("job, keys", [("dpo", ("loss", "rewards/margins", "grad_norm")), ("rm", ("loss", "grad_norm"))])
def test_dpo_and_rm_on_two_nodes_match_one_process(job, keys, tmp_path, tiny_model_path, shared):
    common = _pairs_job(job, tiny_model_path, tmp_path)
    _one_process([*common, "train.batch_size=4", "run.name=one"], tmp_path / "one.log")
    _wait(two_nodes([*common, "train.batch_size=1", "run.name=two"], tmp_path), tmp_path)  # 4 x 1 = 4
    _same(tmp_path / "one", tmp_path / "two", keys, steps=4)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()


REWARD = '''
def vowels(prompts, completions, **info):
    return [10 * sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
'''


def ppo_args(tmp_path, tiny_model_path) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say something about {w}."})
                                 for w in ["bread", "films", "Paris", "music", "rain", "tea", "cats", "maps"]))
    (tmp_path / "rw.py").write_text(REWARD)
    return ["ppo", f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.eval_prompts=2",
            "rollout.max_new_tokens=6", f"reward.function={tmp_path / 'rw.py'}:vowels", "ppo.iterations=3",
            "ppo.prompts_per_iteration=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8", "ppo.eval_every=3",
            "ppo.ppo_epochs=1", "ppo.kl_target=2", "ppo.learning_rate=5e-2", "ppo.value_learning_rate=5e-2",
            f"run.output_dir={tmp_path}", "run.plot=false"]


def test_ppo_on_two_nodes_matches_one_process(tmp_path, tiny_model_path):
    common = ppo_args(tmp_path, tiny_model_path)
    _one_process([*common, "run.name=one"], tmp_path / "one.log")
    _wait(two_nodes([*common, "run.name=two"], tmp_path), tmp_path)
    _same(tmp_path / "one", tmp_path / "two", ("reward_mean", "kl_per_answer", "value_loss", "entropy",
                                                "eval/reward_mean"))


def test_a_node_killed_mid_run_then_both_resumed_finish_as_an_uninterrupted_run(tmp_path, tiny_model_path):
    """Node 1 is SIGKILLed after a checkpoint; node 0's processes see their peers gone (gloo's
    connection closes) and stop; both started again with --resume finish equal to a run that was
    never interrupted. (One folder on loopback stands for a shared file system.)"""
    import contextlib
    import os
    import signal
    import time

    (tmp_path / "slow.py").write_text(REWARD.replace("def vowels(prompts, completions, **info):",
                                                     "def vowels(prompts, completions, **info):\n    __import__('time').sleep(0.4)"))
    common = [*ppo_args(tmp_path, tiny_model_path), "ppo.iterations=6", "run.save_every=1",
              f"reward.function={tmp_path / 'slow.py'}:vowels"]  # ~1 s an iteration: time to kill mid-run
    _one_process([*common, "run.name=one"], tmp_path / "one.log")
    logs = tmp_path / "first"
    logs.mkdir()
    procs = two_nodes([*common, "run.name=two"], logs)
    ckpts = tmp_path / "two" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-2").is_dir():
        assert time.time() < deadline and all(p.poll() is None for p in procs), (logs / "node0.log").read_text()[-3000:]
        time.sleep(0.2)
    for pid in [procs[1].pid, *_descendants(procs[1].pid)]:  # the whole second machine, at once
        with contextlib.suppress(ProcessLookupError):  # (torchrun's workers have sessions of their own)
            os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    assert procs[0].wait(timeout=180) != 0  # node 0 does not hang on its lost peers
    stopped_in = time.time() - t0
    procs[1].wait(timeout=30)
    assert not (tmp_path / "two" / "summary.json").exists()
    logs = tmp_path / "second"
    logs.mkdir()
    _wait(two_nodes([*common, "run.name=two", "--resume"], logs), logs)
    _same(tmp_path / "one", tmp_path / "two", ("reward_mean", "kl_per_answer", "value_loss", "entropy",
                                                "eval/reward_mean"))
    assert sorted(r["step"] for r in _records(tmp_path / "two") if "reward_mean" in r) == [1, 2, 3, 4, 5, 6]
    assert stopped_in < 120, stopped_in  # seconds node 0 took to give up on its lost peers


def test_machines_that_do_not_share_the_run_folder_are_refused_at_start(tmp_path, tiny_model_path, shared):
    """Machine 1 sees its own empty disk at run.output_dir (a tmpfs mounted there in a mount
    namespace of its own): every rank stops at the start with an error naming the folder and the
    blind ranks -- not at the first save, and no hang."""
    out = tmp_path / "out"
    out.mkdir()
    args = [*_pairs_job("dpo", tiny_model_path, out), "train.batch_size=1", "run.name=two", "model.dtype=float32"]
    port = _free_port()
    procs = []
    for node in (0, 1):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                    "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--rdzv-id", f"align-{port}", "-m", "align.cli", *args]
        cmd = torchrun if node == 0 else ["unshare", "-m", "--propagation", "private", "sh", "-c",
                                          f'mount -t tmpfs tmpfs "{out}" && exec "$@"', "sh", *torchrun]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=open(tmp_path / f"node{node}.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert all(codes), (codes, logs[0][-2000:], logs[1][-2000:])
    assert "is not the same folder on every machine (rank 2 on" in logs[0], logs[0][-3000:]
    assert "rank 3 on" in logs[0] and "put run.output_dir on a shared file system" in logs[0]
    assert not (out / "two" / "metrics.jsonl").exists()  # nothing trained
