import gzip
import json

import pytest

from align.data import DataError, load_preference_split, load_preference_splits
from align.data.hh_rlhf import parse_transcript, split_pair
from align.data.preference import normalize_pair, read_preference_jsonl
from align.config import DataConfig

SUBSETS = ["harmless-base", "helpful-base", "helpful-rejection-sampled"]


@pytest.mark.parametrize("subset", SUBSETS)
def test_every_real_subset_parses(hh_root, subset):
    path = hh_root / subset / "test.jsonl.gz"
    rows, report = read_preference_jsonl(path)
    total = report.kept + report.total_skipped
    assert total > 2000
    # Skipped rows are reported and rare (<2%: ~1.2% of rejection-sampled rows have identical answers).
    assert report.total_skipped < 0.02 * total, report.summary()
    print(subset, report.summary(), report.examples[:3])
    for row in rows[:200]:
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["role"] == "assistant" and row["chosen"][0]["content"]
        assert row["chosen"] != row["rejected"]
        assert row["source"].startswith(str(path))


def test_first_real_row_exact(hh_root):
    rows, _ = read_preference_jsonl(hh_root / "helpful-base" / "test.jsonl.gz", limit=1)
    assert rows[0]["prompt"] == [{"role": "user", "content":
        "Do you know why turkeys became the official food of thanksgiving?"}]
    assert rows[0]["chosen"][0]["content"].startswith("To be honest, I don’t know")


def test_multi_turn_prompt():
    pair = split_pair("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
                      "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad")
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["chosen"][0]["content"] == "good" and pair["rejected"][0]["content"] == "bad"


def _write(tmp_path, lines):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})


def test_crafted_edge_cases_counted_with_lines(tmp_path):
    lines = [
        GOOD,
        '{"chosen": "oops',  # 2: malformed JSON
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: x"}),  # 3 empty
        json.dumps({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}),  # 4 differ
        json.dumps({"chosen": "just some text", "rejected": "other text"}),  # 5 not HH
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: x"}),  # 6 missing field
        GOOD,
    ]
    path = _write(tmp_path, lines)
    rows, report = read_preference_jsonl(path)
    assert report.kept == 2 and report.total_skipped == 5
    text = "\n".join(report.examples)
    for lineno, reason in [(2, "malformed JSON"), (3, "empty turn"), (4, "prompt mismatch"),
                           (5, "not an HH transcript"), (6, "missing field")]:
        assert f"{path}:{lineno}: {reason}" in text


def test_strict_raises_with_line(tmp_path):
    path = _write(tmp_path, [GOOD, '{"chosen": '])
    with pytest.raises(DataError, match=r"rows\.jsonl\.gz:2: malformed JSON"):
        read_preference_jsonl(path, strict=True)


def test_parse_transcript_rejects_non_hh():
    with pytest.raises(ValueError, match="not an HH transcript"):
        parse_transcript("Hello there")


@pytest.mark.parametrize("row, expect", [
    ({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "plain"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "g"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "conv"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "g"}],
      "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "b"}]}, "conv"),
])
def test_trl_formats(row, expect):
    out = normalize_pair(row)
    if expect == "plain":
        assert out == {"prompt": "Q?", "chosen": "good", "rejected": "bad"}
    else:
        assert out["prompt"] == [{"role": "user", "content": "Q?"}]
        assert out["chosen"][0]["content"] == "g" and out["rejected"][0]["content"] == "b"


def test_user_jsonl_and_parquet(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"} for i in range(5)]
    jl = tmp_path / "train.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"prompt\": \"x\"}\n")
    got, rep = load_preference_split(str(jl), [], "")
    assert len(got) == 5 and rep.skipped["missing field"] == 1
    assert f"{jl}:6" in rep.examples[0]
    import datasets
    pq = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    got, rep = load_preference_split(str(pq), [], "")
    assert len(got) == 5 and rep.total_skipped == 0


def test_splits_held_out_by_subset(shared):
    cfg = DataConfig(max_train_pairs=50, max_eval_pairs=20)
    train, ev, reports = load_preference_splits(cfg)
    assert len(train) == 50 and len(ev) == 20
    assert all("helpful-base" not in r["source"] for r in train)
    assert all("helpful-base/" in r["source"] for r in ev)
    with pytest.raises(DataError, match="overlaps"):
        load_preference_splits(DataConfig(train_subsets=["helpful-base"]))


def test_missing_dataset_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_preference_split(str(tmp_path / "nope.jsonl"), [], "")
