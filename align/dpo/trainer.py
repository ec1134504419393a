"""TRL's DPOTrainer, made to run near plain-PyTorch cost on a CPU.

TRL 1.16 scores log-probs through a fused LM head that, without Triton, loops in Python over
small token x vocabulary tiles of *every* position (prompt and padding included). Here the
model's ``fused_lm_head`` path is replaced by :func:`align.scoring.pairs.install_packed_forward`: each pair is one packed
row (prompt once), and only answer tokens go through the vocabulary projection. TRL keeps the
loss variants, metrics, optimizer/scheduler and the PEFT reference (adapter disabled, no second
model); reference log-probs are computed once before training and reused.
"""
from __future__ import annotations

import torch
from trl import DPOConfig, DPOTrainer

from ..checkpoints import AtomicCheckpoints, hf_warmup
from ..placement import resolve_device, resolve_dtype
from ..deps.trl_internals import use_precomputed_reference
from ..scoring.pairs import LengthGroupedPairBatches, PackedPairCollator, install_packed_forward, packed_pair_logps
from .objectives import kl_estimate, kto, objective_loss


class PackedDPOTrainer(AtomicCheckpoints, LengthGroupedPairBatches, DPOTrainer):
    """``objective``: ``dpo`` (TRL's loss, ``loss_type``) or a reference-free objective of
    :mod:`align.dpo.objectives` (``simpo``, ``orpo``), computed here on the packed scores --
    TRL's CPO/ORPO trainers have no packed (``fused_lm_head``) path -- with no reference pass;
    or ``kto`` on unpaired rows packed as (the row's answer, a mismatched answer)."""

    def __init__(self, *args, max_length: int, max_prompt_length: int, objective: str = "dpo",
                 train_cfg=None, **kwargs):
        self.objective, self.train_cfg, self._objective_metrics = objective, train_cfg, {}
        ds = kwargs.get("train_dataset")
        labels = ds["label"] if ds is not None and "label" in ds.column_names else None
        tok = kwargs["processing_class"]
        kwargs.setdefault("data_collator", PackedPairCollator(
            pad_token_id=tok.pad_token_id, max_length=max_length,
            max_prompt_length=max_prompt_length))
        super().__init__(*args, **kwargs)
        # Handed a PeftModel, TRL adds a "ref" adapter (a copy of "default") as the reference.
        # align's reference is the base with adapters disabled -- which TRL falls back to without
        # "ref" -- so drop it: no extra weights, and checkpoints hold one adapter (with "ref" in
        # a sub-folder, transformers' resume loads only "ref" and skips the trained adapter).
        peft_model = self.model
        if "ref" in getattr(peft_model, "peft_config", {}):
            peft_model.delete_adapter("ref")
            peft_model.set_adapter("default")
        if labels is not None and "label" not in self.train_dataset.column_names:  # TRL's tokenizing drops it
            if len(self.train_dataset) != len(labels):
                raise RuntimeError(f"TRL's tokenizing changed the number of rows ({len(labels)} -> "
                                   f"{len(self.train_dataset)}): KTO's labels no longer line up")
            self.train_dataset = self.train_dataset.add_column("label", labels)
        # TRL patched the forwards with its fused head; put ours in their place.
        install_packed_forward(self.model.get_base_model())
        if self.ref_model is not None:  # only when a user passes a separate reference model
            install_packed_forward(self.ref_model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective == "dpo":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.objective == "kto":
            loss = self._kto_loss(model, inputs)
            return (loss, {"loss": loss}) if return_outputs else loss
        chosen, rejected, chosen_n, rejected_n = packed_pair_logps(model, inputs)
        loss, parts = objective_loss(self.objective, chosen, rejected, chosen_n, rejected_n, self.train_cfg)
        c, r = parts.pop("chosen_rewards"), parts.pop("rejected_rewards")
        # the same names as TRL's DPO metrics, over every process's pairs
        for name, v in {"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
                        "rewards/accuracies": (c > r).float(), **parts}.items():
            v = self.accelerator.gather_for_metrics(v.detach().float().reshape(-1))
            self._objective_metrics.setdefault(name, []).append(float(v.mean()))
        return (loss, {"loss": loss}) if return_outputs else loss

    def _kto_loss(self, model, inputs):
        """KTO on rows packed as (row's answer, a mismatched answer) pairs: the second slot's
        log-ratio is the KL estimate, averaged over processes like TRL's."""
        t = self.train_cfg
        own, mismatched, _, _ = packed_pair_logps(model, inputs)
        kl = self.accelerator.gather_for_metrics(
            kl_estimate(mismatched, inputs["ref_rejected_logps"]).reshape(1)).mean().clamp(min=0)
        loss, parts = kto(own, inputs["ref_chosen_logps"], inputs["label"], kl, t.beta,
                          t.kto_desirable_weight, t.kto_undesirable_weight)
        c, r = parts["chosen_rewards"], parts["rejected_rewards"]
        # sums and counts gathered (a process may hold no row of one kind)
        sums = self.accelerator.gather_for_metrics(torch.stack(
            [c.sum(), c.new_tensor(len(c)), r.sum(), r.new_tensor(len(r))]).float().reshape(1, 4)).sum(0)
        chosen, rejected = float(sums[0] / sums[1].clamp(min=1)), float(sums[2] / sums[3].clamp(min=1))
        for name, v in {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                        "kl": float(kl)}.items():
            self._objective_metrics.setdefault(name, []).append(v)
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        logs.update({k: sum(v) / len(v) for k, v in self._objective_metrics.items() if v})
        self._objective_metrics = {}
        super().log(logs, start_time)

    def attach_reference_logps(self, ref_scores) -> None:
        """Use reference log-probs computed once by :func:`align.scoring.pairs.score_pairs`
        (length-sorted batches) instead of recomputing the reference at every step."""
        ds = self.train_dataset
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            if name in ds.column_names:
                ds = ds.remove_columns(name)
        ds = ds.add_column("ref_chosen_logps", ref_scores.chosen_logp.tolist())
        ds = ds.add_column("ref_rejected_logps", ref_scores.rejected_logp.tolist())
        self.train_dataset = ds
        use_precomputed_reference(self)  # TRL's loss then reads them from the batch


def dpo_args(cfg, output_dir: str) -> DPOConfig:
    t = cfg.train
    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        warmup_steps=hf_warmup(t.warmup_ratio),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="linear",
        beta=t.beta,
        loss_type=list(t.loss_type) if isinstance(t.loss_type, list) else [t.loss_type],
        loss_weights=list(t.loss_weights) or None,
        label_smoothing=t.label_smoothing,
        # Truncation happens in the collator (prompt keeps its end, answers their start).
        max_length=None,
        # Reference log-probs are precomputed by align (attach_reference_logps), not by TRL,
        # whose precompute pass batches in dataset order (long, padded batches).
        precompute_ref_log_probs=False,
        logging_steps=cfg.run.log_every,
        # Checkpoints go to <run>/checkpoints/step-N (AtomicCheckpoints), rotated by align.
        save_strategy="steps" if cfg.run.save_every else "no",
        save_steps=cfg.run.save_every or 500,
        report_to=cfg.run.report_to or "none",
        use_cpu=resolve_device(cfg.model.device).type == "cpu",
        ddp_find_unused_parameters=False,  # LoRA: every trainable weight is used at every step
        bf16=resolve_dtype(cfg.model.dtype) == "bfloat16",  # not run here: no GPU on this machine
        fp16=resolve_dtype(cfg.model.dtype) == "float16",
        seed=cfg.run.seed,
        data_seed=cfg.data.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # KTO's label column is none of the columns TRL keeps for the model; the collator reads ids
        remove_unused_columns=t.objective != "kto",
    )
