"""`align rm`'s model and trainer: the base as a 1-output classifier + LoRA, the Bradley-Terry
loss on packed pairs, the transformers Trainer that runs it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from ..checkpoints import AtomicCheckpoints, hf_warmup
from ..scoring.pairs import LengthGroupedPairBatches, install_packed_scorer
from ..scoring.stats import tie_half_accuracy
from ..placement import resolve_device, resolve_dtype


def new_reward_model(model_cfg, lora_cfg):
    """The base as a 1-output sequence classifier with a fresh LoRA adapter; the score head
    (zero-initialised, so every pair starts as a tie) is trained in full."""
    from peft import get_peft_model

    from ..models import load_base, lora_peft_config

    base, tok = load_base(model_cfg, kind="classifier")
    torch.nn.init.zeros_(base.score.weight)
    model = get_peft_model(base, lora_peft_config(lora_cfg, task_type="SEQ_CLS"))
    install_packed_scorer(model.get_base_model())
    return model, tok


def pair_loss(scores: torch.Tensor, center_coef: float) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry on (B, 2) scores [chosen, rejected], mean over pairs, plus the centering
    term; also the batch's accuracy (ties 1/2) and mean margin."""
    margin = scores[:, 0] - scores[:, 1]
    loss = -F.logsigmoid(margin).mean() + center_coef * scores.sum(1).pow(2).mean()
    with torch.no_grad():
        acc = tie_half_accuracy(margin)
    return loss, {"accuracy": acc, "margin": float(margin.mean().detach())}


class PackedRewardTrainer(AtomicCheckpoints, LengthGroupedPairBatches, Trainer):
    center_coef: float = 0.0

    def __init__(self, *args, center_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.center_coef, self._pending = center_coef, []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = model(**inputs)
        loss, stats = pair_loss(scores, self.center_coef)
        self._pending.append(stats)
        return (loss, scores) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The training accuracy and margin since the last log, beside the loss."""
        if self._pending and "loss" in logs:
            for k in ("accuracy", "margin"):
                logs[k] = sum(s[k] for s in self._pending) / len(self._pending)
            self._pending = []
        super().log(logs, *args, **kwargs)


def rm_args(cfg, output_dir: str) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=t.batch_size, learning_rate=t.learning_rate,
        num_train_epochs=t.epochs, max_steps=t.max_steps if t.max_steps > 0 else -1, warmup_steps=hf_warmup(t.warmup_ratio),
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, lr_scheduler_type="linear",
        logging_steps=cfg.run.log_every, save_strategy="steps" if cfg.run.save_every else "no",
        save_steps=cfg.run.save_every or 500, report_to=cfg.run.report_to or "none",
        use_cpu=resolve_device(cfg.model.device).type == "cpu", bf16=resolve_dtype(cfg.model.dtype) == "bfloat16",
        fp16=resolve_dtype(cfg.model.dtype) == "float16", seed=cfg.run.seed, data_seed=cfg.data.seed,
        dataloader_num_workers=0, remove_unused_columns=False, ddp_find_unused_parameters=False)


