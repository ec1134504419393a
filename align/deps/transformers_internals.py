"""transformers' private API, as align's HF-Trainer jobs (DPO, RM) use it -- the one module
that touches it.

- ``Trainer._save_checkpoint(model, trial)``: overridden so a checkpoint is written into a
  staging folder and renamed into place (:class:`align.checkpoints.AtomicCheckpoints`).
- ``Trainer._get_train_sampler(train_dataset)``: overridden for length-grouped pair batches
  (:func:`align.scoring.pairs.grouped_sampler`).

:class:`TrainerHooks` is the only class that names them; the mixins above implement
``align_save_checkpoint`` and ``align_train_sampler`` instead.
"""
from __future__ import annotations

import inspect

from . import check as _check


def _params(name: str) -> list[str]:
    from transformers import Trainer

    return list(inspect.signature(getattr(Trainer, name)).parameters)[1:]


PRIVATE = {
    "Trainer._save_checkpoint(model, trial)": lambda: _params("_save_checkpoint") == ["model", "trial"],
    "Trainer._get_train_sampler(train_dataset)": lambda: _params("_get_train_sampler") == ["train_dataset"],
}


def check() -> None:
    """Raise :class:`align.deps.DependencyError` naming any private symbol the installed
    transformers lacks."""
    import transformers

    _check("transformers", PRIVATE, transformers.__version__)


class TrainerHooks:
    """Mixin for a transformers Trainer (before it in the bases): forwards the private methods
    align overrides to hooks with stable names; without a hook the Trainer's own runs."""

    def _save_checkpoint(self, model, trial):
        parent = super()._save_checkpoint
        hook = getattr(self, "align_save_checkpoint", None)
        return hook(lambda: parent(model, trial)) if hook else parent(model, trial)

    def _get_train_sampler(self, train_dataset=None):
        hook = getattr(self, "align_train_sampler", None)
        if hook is None:
            return super()._get_train_sampler(train_dataset)
        return hook(train_dataset if train_dataset is not None else self.train_dataset)
