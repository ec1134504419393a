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
