"""TRL's DPOTrainer, made to run near plain-PyTorch cost on a CPU.

TRL 1.16 scores log-probs through a fused LM head that, without Triton, loops in Python over
small token x vocabulary tiles of *every* position (prompt and padding included). Here the
model's ``fused_lm_head`` path is replaced by :mod:`align.dpo.packing`: each pair is one packed
row (prompt once), and only answer tokens go through the vocabulary projection. TRL keeps the
loss variants, metrics, optimizer/scheduler and the PEFT reference (adapter disabled, no second
model); reference log-probs are computed once before training and reused.
"""
from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import DPOConfig, DPOTrainer

from ..checkpoints import AtomicCheckpoints
from ..models import resolve_device, resolve_dtype
from .packing import PackedPairCollator, install_packed_forward, packed_length


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order that depends only on (seed, epoch): a run resumed in epoch 2 sees
    exactly the order an uninterrupted one would (a shared generator would not)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return super().__iter__()


class PackedDPOTrainer(AtomicCheckpoints, DPOTrainer):
    def __init__(self, *args, max_length: int, max_prompt_length: int, **kwargs):
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
        # TRL patched the forwards with its fused head; put ours in their place.
        install_packed_forward(self.model.get_base_model())
        if self.ref_model is not None:  # only when a user passes a separate reference model
            install_packed_forward(self.ref_model)

    def attach_reference_logps(self, ref_scores) -> None:
        """Use reference log-probs computed once by :func:`align.dpo.evaluate.score_pairs`
        (length-sorted batches) instead of recomputing the reference at every step."""
        ds = self.train_dataset
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            if name in ds.column_names:
                ds = ds.remove_columns(name)
        ds = ds.add_column("ref_chosen_logps", ref_scores.chosen_logp.tolist())
        ds = ds.add_column("ref_rejected_logps", ref_scores.rejected_logp.tolist())
        self.train_dataset = ds
        self.precompute_ref_logps = True  # TRL's _compute_loss then reads them from the batch

    def _get_train_sampler(self, train_dataset=None):
        """Batches of similar packed length: HH lengths vary a lot, and padding is pure waste
        (random batches of 8 real pairs were ~45% padding). Megabatches of 50 batches are sorted
        by length, so the order stays random at the scale of an epoch. Grouping is by the
        *global* batch, so N processes see the same batches as one (each takes its slice)."""
        ds = train_dataset if train_dataset is not None else self.train_dataset
        col = self.data_collator
        lengths = [packed_length(len(p), len(c), len(r), col.max_length, col.max_prompt_length)
                   for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSeededLengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            lengths=lengths, seed=seed)


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
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="linear",
        beta=t.beta,
        loss_type=[t.loss_type],
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
    )
