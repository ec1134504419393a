"""The reference-score store (train.reference_cache, align/dpo/reference_store.py): a key that
changes with everything that decides a score, entries read back exactly, a damaged entry never
trusted, and a second DPO run on the same base and pairs reading instead of scoring."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from align.dpo import reference_store


def _pairs(n=4, bump=0):
    g = torch.Generator().manual_seed(0)
    r = lambda k: torch.randint(5, 90, (k,), generator=g).tolist()  # noqa: E731
    rows = [{"prompt_ids": r(6), "chosen_ids": r(4), "rejected_ids": r(3)} for _ in range(n)]
    rows[-1]["rejected_ids"][-1] += bump
    return rows


@pytest.fixture()
def policy(tiny_model_path):
    from align.config import LoraConfig, ModelConfig
    from align.models import add_policy_adapter, load_base

    base, tok = load_base(ModelConfig(name=tiny_model_path, dtype="float32", device="cpu"))
    return add_policy_adapter(base, LoraConfig(r=2)), tok


def test_the_key_changes_with_everything_that_decides_a_score(policy):
    from align.scoring.pairs import PackedPairCollator

    model, tok = policy
    collator = PackedPairCollator(tok.pad_token_id, 64, 32)
    key = lambda pairs=None, coll=collator, batch=2: reference_store.entry_key(model, pairs or _pairs(), coll, batch)[0]  # noqa: E731
    first = key()
    assert key() == first  # the same inputs: the same entry
    assert key(pairs=_pairs(bump=1)) != first  # one token of one pair
    assert key(batch=4) != first  # batching (padding changes the float sums)
    assert key(coll=PackedPairCollator(tok.pad_token_id, 48, 32)) != first  # truncation
    with torch.no_grad():  # one base weight; the adapter's own weights do not count
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
        assert key() == first
        w = model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
        w[0, 0] += 1e-3
        assert key() != first
        w[0, 0] -= 1e-3


def test_an_entry_reads_back_exactly_and_a_damaged_one_is_recomputed_and_left(tmp_path):
    scores = {"chosen_logp": torch.tensor([-1.25, -3.5]), "chosen_tokens": torch.tensor([3, 4])}
    found, lookup = reference_store.read(tmp_path, "k1")
    assert found is None and not lookup.hit
    reference_store.write(tmp_path, "k1", {"why": "test", "versions": {"torch": torch.__version__}}, scores, 12.34, lookup)
    assert lookup.saved
    found, again = reference_store.read(tmp_path, "k1")
    assert again.hit and again.computed_seconds == 12.3
    assert all(torch.equal(found[k], v) and found[k].dtype == v.dtype for k, v in scores.items())

    (tmp_path / "k2.pt").write_bytes(b"not a torch file")
    found, lookup = reference_store.read(tmp_path, "k2")
    assert found is None and "could not be read" in lookup.note
    reference_store.write(tmp_path, "k2", {}, scores, 1.0, lookup)
    assert (tmp_path / "k2.pt").read_bytes() == b"not a torch file" and not lookup.saved
    torch.save({"key": "elsewhere", "scores": scores, "seconds": 1.0}, tmp_path / "k3.pt")
    assert reference_store.read(tmp_path, "k3")[0] is None


def test_the_setting_names_the_folder(monkeypatch, tmp_path):
    from align.config import ConfigError

    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path))
    assert reference_store.store_folder("auto") == tmp_path / "reference-scores"
    assert reference_store.store_folder("off") is None
    assert reference_store.store_folder(str(tmp_path / "x")) == tmp_path / "x"
    with pytest.raises(ConfigError, match="train.reference_cache"):
        reference_store.store_folder(" ")


def test_a_second_run_on_the_same_pairs_reads_its_reference_scores(tmp_path, tiny_model_path, shared):
    """Run 1 scores and keeps; run 2 (the same pairs, another beta) reads every split and ends
    with the same reference scores; a run with the store off neither reads nor keeps."""
    store = tmp_path / "store"

    def dpo(name, *extra):
        args = ["dpo", f"model.name={tiny_model_path}", "data.max_train_pairs=10", "data.validation_pairs=2",
                "data.max_eval_pairs=4", "train.max_length=64", "train.max_prompt_length=32", "train.batch_size=4",
                f"run.output_dir={tmp_path}", f"run.name={name}", "run.plot=false", "model.dtype=float32",
                f"train.reference_cache={store}", *extra]
        out = subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return tmp_path / name, json.loads((tmp_path / name / "run.json").read_text())

    first, said1 = dpo("a")
    assert {s: v["hit"] for s, v in said1["reference_cache"].items()} == {"train": False, "eval": False, "validation": False}
    assert len(list(store.glob("*.pt"))) == 3
    second, said2 = dpo("b", "train.beta=0.3")
    assert {s: v["hit"] for s, v in said2["reference_cache"].items()} == {"train": True, "eval": True, "validation": True}
    for split in ("train", "eval", "validation"):
        a, b = (torch.load(r / f"reference_logps_{split}.pt") for r in (first, second))
        assert all(torch.equal(a[k], b[k]) for k in a), split
    compute = json.loads((second / "summary.json").read_text())["compute"]
    assert set(compute["read_from_store"]) == {"reference_train", "reference_eval"}
    assert "reference_train" not in compute["phases"] and "train" in compute["phases"]
    third, said3 = dpo("c", "train.reference_cache=off")
    assert "reference_cache" not in said3 and len(list(store.glob("*.pt"))) == 3
