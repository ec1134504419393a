"""Hardening 3 (issue 41): a missing answer is no score, and a byte that is not UTF-8 is named."""
import math

import pytest

from align.data.rows import DataError, LoadReport, iter_jsonl


@pytest.mark.parametrize("grader", ["exact_match", "numeric_match", "number_only_match", "math_match"])
@pytest.mark.parametrize("missing", [None, "", "   ", math.nan])
def test_every_grader_gives_no_score_for_a_missing_answer(grader, missing):
    """84b20d5: exact_match gave 1.0 to the answer "None" of a row without an answer, the others
    0.0 (math_match None for ""): a missing label trained the policy."""
    import reward.verify as verify

    fn = getattr(verify, grader)
    assert fn(["None", "0", "7"], answer=[missing, missing, missing]) == [None, None, None]
    assert fn(["7"], answer=["7"]) == [1.0]  # a present answer is still graded


def test_accuracy_leaves_out_prompts_with_a_blank_answer():
    from align.verifiable import graded

    rows = [{"fields": {"answer": "3"}}, {"fields": {"answer": ""}}, {"fields": {"answer": None}}, {"fields": {}}]
    assert graded(rows, "answer") == rows[:1]


@pytest.mark.parametrize("gz", [False, True])
def test_a_non_utf8_byte_is_named_by_line_and_offset(tmp_path, gz):
    """84b20d5 said the file was "truncated or corrupt after line 0 ... download it again"."""
    import gzip

    data = b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n'
    path = tmp_path / ("rows.jsonl.gz" if gz else "rows.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as e:
        list(iter_jsonl(path, LoadReport()))
    msg = str(e.value)
    assert f"{path}:3: not UTF-8: byte 0xe9 at byte 15 of the line (47 of the file" in msg
    assert "truncated" not in msg


def test_a_bom_and_utf8_still_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9"}\n')
    assert [row for _, row in iter_jsonl(path, LoadReport())] == [{"prompt": "café"}]


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    from align.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: not UTF-8: byte 0xe9 at byte 11 of the line"):
        load_config("dpo", str(path), [])


def test_a_reward_that_changes_folder_seeds_and_threads_changes_nothing_outside(tmp_path, tiny_model_path,
                                                                                monkeypatch):
    """84b20d5: a reward calling os.chdir with the default relative run.output_dir ended the run
    after its first iteration ([Errno 2] No such file or directory: 'runs'), a stale .lock left."""
    import json

    import torch

    from align.config import load_config
    from align.ppo import run_ppo

    work = tmp_path / "work"
    (work / "elsewhere").mkdir(parents=True)
    (work / "moving.py").write_text(
        "import os, random, torch\n"
        "def reward(prompts, completions, **info):\n"
        "    os.chdir(os.path.join(os.path.dirname(__file__), 'elsewhere'))\n"
        "    random.seed(1); torch.manual_seed(1); torch.set_num_threads(1)\n"
        "    return [float(len(c)) for c in completions]\n")
    (work / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": f"say {i}"}) for i in range(8)) + "\n")
    monkeypatch.chdir(work)
    threads = torch.get_num_threads()
    cfg = load_config("ppo", None, [f"model.name={tiny_model_path}", "data.dataset=prompts.jsonl",
                                    "reward.function=moving.py:reward", "ppo.iterations=2", "ppo.advantage=grpo",
                                    "ppo.prompts_per_iteration=2", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4",
                                    "rollout.max_new_tokens=4", "data.eval_prompts=2", "run.name=moved", "run.plot=false"])
    run_ppo(cfg)
    assert (work / "runs" / "moved" / "summary.json").is_file()  # under the folder the run started in
    assert not (work / "elsewhere" / "runs").exists()
    assert torch.get_num_threads() == threads


# -- a disk that refuses -------------------------------------------------------------------


def _dpo_args(model, out):
    return ["dpo", f"model.name={model}", "model.dtype=float32", f"run.output_dir={out}", "run.name=d",
            "run.save_every=1", "data.max_train_pairs=16", "data.max_eval_pairs=8", "train.batch_size=4",
            "train.max_length=96", "train.max_prompt_length=48"]


@pytest.fixture()
def small_disk(tmp_path):
    """A 600 KB tmpfs (root can mount one here and in CI); None where mounting is not allowed."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True).returncode:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_while_saving_a_checkpoint_says_so_and_keeps_the_last_good_one(small_disk, tiny_model_path,
                                                                                     tmp_path, shared, monkeypatch):
    """84b20d5: a raw SafetensorError traceback, and checkpoints/.tmp-step-2/ left on the full disk."""
    import errno
    import subprocess
    import sys

    if small_disk is not None:
        proc = subprocess.run([sys.executable, "-m", "align.cli", *_dpo_args(tiny_model_path, small_disk)],
                              capture_output=True, text=True, timeout=600)
        rc, err, run = proc.returncode, proc.stderr, small_disk / "d"
    else:  # no tmpfs here: the checkpoint writer refuses as a full disk would
        import safetensors.torch

        from align.cli import main

        real, calls = safetensors.torch.save_file, []

        def refuse_second(*a, **k):
            calls.append(1)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **k)

        monkeypatch.setattr(safetensors.torch, "save_file", refuse_second)
        rc, run = main(_dpo_args(tiny_model_path, tmp_path / "out")), tmp_path / "out" / "d"
        err = ""
    assert rc == 1
    if small_disk is not None:
        line = [l.split("align: error:", 1)[1] for l in err.splitlines() if "align: error:" in l]  # after tqdm's bar
        assert len(line) == 1 and "Traceback" not in err, err[-2000:]
        assert "saving the checkpoint of step" in line[0] and "No space left on device" in line[0]
        assert "MiB free" in line[0] and "--resume" in line[0] and "run.name=d" in line[0]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts and all(name.startswith("step-") for name in ckpts), ckpts  # no partial .tmp-step-*
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()


def test_a_refused_log_line_leaves_no_torn_line_and_a_refused_json_the_old_file(tmp_path, monkeypatch):
    import builtins
    import errno
    import json
    import os

    from align.atomic import DiskFull, atomic_write_text
    from align.config import load_config
    from align.runs import RunDir

    cfg = load_config("dpo", None, [f"run.output_dir={tmp_path}", "run.name=r"])
    run = RunDir(cfg.run, cfg, "dpo")
    run.log({"step": 1, "loss": 0.5})
    real_open = builtins.open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: HalfWriter(real_open(p, *a, **k))
                        if str(p).endswith("metrics.jsonl") else real_open(p, *a, **k))
    with pytest.raises(DiskFull, match="logging to metrics.jsonl: No space left on device"):
        run.log({"step": 2, "loss": 0.4})
    monkeypatch.undo()
    assert [json.loads(l) for l in run.metrics_path.read_text().splitlines()] == [{"step": 1, "loss": 0.5}]
    target = tmp_path / "eval.json"
    atomic_write_text(target, "old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(DiskFull, match="writing eval.json: Disk quota exceeded.*is as it was"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir() if p.name.startswith("eval.json.")] == []
