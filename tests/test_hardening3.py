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
