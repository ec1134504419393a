"""TRL's private API, as align's DPO job uses it -- the one module that touches it.

- ``FusedCausalLMOutput`` (trl.trainer.utils): what DPOTrainer expects back from the model's
  ``fused_lm_head=True`` forward, the path :func:`align.scoring.pairs.install_packed_forward`
  replaces with packed pair scoring.
- ``DPOTrainer.precompute_ref_logps``: set after the fact, it makes ``_compute_loss`` read the
  reference log-probs align computed once (``ref_chosen_logps``/``ref_rejected_logps`` columns).
- ``DPOTrainer._total_train_tokens``: TRL's running token count, kept across a resume.
"""
from __future__ import annotations

import inspect

from . import check as _check

TOTAL_TOKENS_ATTR = "_total_train_tokens"


def _dpo_source() -> str:
    from trl.trainer import dpo_trainer

    return inspect.getsource(dpo_trainer)


def _has_fused_output() -> bool:
    from trl.trainer.utils import FusedCausalLMOutput

    return {"loss", "log_probs", "entropy", "mean_logits", "is_top1", "label_mask"} <= set(
        FusedCausalLMOutput.__dataclass_fields__)


PRIVATE = {
    "trl.trainer.utils.FusedCausalLMOutput": _has_fused_output,
    "DPOTrainer(model(..., fused_lm_head=True))": lambda: "fused_lm_head=True" in _dpo_source(),
    "DPOTrainer.precompute_ref_logps + ref_chosen_logps batch columns": lambda: (
        "if self.precompute_ref_logps" in _dpo_source() and 'inputs["ref_chosen_logps"]' in _dpo_source()),
    f"DPOTrainer.{TOTAL_TOKENS_ATTR}": lambda: f"self.{TOTAL_TOKENS_ATTR}" in _dpo_source(),
}


def check() -> None:
    """Raise :class:`align.deps.DependencyError` naming any private symbol the installed TRL lacks."""
    import trl

    _check("trl", PRIVATE, trl.__version__)


def fused_lm_output(**fields):
    """The object DPOTrainer reads back from a ``fused_lm_head=True`` forward."""
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(**fields)


def use_precomputed_reference(trainer) -> None:
    """Make DPOTrainer's loss read reference log-probs from the batch instead of recomputing them."""
    trainer.precompute_ref_logps = True
