"""Each private TRL/transformers symbol align relies on, pinned: an upgrade that moves one fails
here (and at a job's start, before any folder is written) naming it."""
from __future__ import annotations

import pytest

from align.deps import DependencyError, check, missing
from align.deps import transformers_internals
from align.deps import trl_internals


@pytest.mark.parametrize("door", [trl_internals, transformers_internals], ids=["trl", "transformers"])
def test_every_private_symbol_is_present(door):
    assert door.PRIVATE and missing(door.PRIVATE) == []
    door.check()


def test_a_missing_symbol_is_named_in_the_error():
    table = {"Present.thing": lambda: True, "Gone.thing": lambda: getattr(object, "nope"), "False.thing": lambda: False}
    assert missing(table) == ["Gone.thing", "False.thing"]
    with pytest.raises(DependencyError, match=r"trl 9\.9 lacks .*Gone\.thing, False\.thing.*align/deps/trl_internals\.py"):
        check("trl", table, "9.9")


def test_the_hooks_reach_the_trainer_private_methods():
    """TrainerHooks forwards transformers' private methods to align's hooks, and to the
    Trainer's own code when a class defines no hook."""
    from transformers import Trainer

    from align.deps.transformers_internals import TrainerHooks

    calls = []

    class Base:
        def _save_checkpoint(self, model, trial):
            calls.append(("saved", model, trial))

        def _get_train_sampler(self, train_dataset=None):
            return ("default", train_dataset)

    class Hooked(TrainerHooks, Base):
        train_dataset = "ds"

        def align_save_checkpoint(self, write):
            calls.append("before")
            write()

        def align_train_sampler(self, dataset):
            return ("grouped", dataset)

    class Plain(TrainerHooks, Base):
        train_dataset = "ds"

    Hooked()._save_checkpoint("m", None)
    assert calls == ["before", ("saved", "m", None)]
    assert Hooked()._get_train_sampler() == ("grouped", "ds") and Plain()._get_train_sampler("x") == ("default", "x")
    assert hasattr(Trainer, "_save_checkpoint") and hasattr(Trainer, "_get_train_sampler")


def test_only_the_doors_name_private_trl_and_transformers_api():
    """Outside align/deps/, no align module names the private symbols the doors list."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "align"
    names = ("_prepare_dataset", "precompute_ref_logps", "FusedCausalLMOutput", "_save_checkpoint",
             "_get_train_sampler", "_total_train_tokens", "trl.trainer.utils")
    found = [f"{p.relative_to(root)}: {n}" for p in root.rglob("*.py") if p.parent.name != "deps"
             for n in names if re.search(rf"(?<![A-Za-z]){re.escape(n)}", p.read_text())]
    assert found == []
