"""`align rm`: a LoRA reward model trained on packed preference pairs.

The model is the base as a 1-output sequence classifier: a LoRA adapter on all linear layers
plus a trained score head (PEFT's ``modules_to_save``), saved as a standard PEFT ``SEQ_CLS``
adapter -- it loads with ``AutoModelForSequenceClassification`` + ``PeftModel``, and `align ppo`
puts it on the policy's own base (``reward.kind=classifier``). Training reads each pair as ONE
packed row, as DPO does (prompt once, chosen and rejected kept apart), and scores the last token
of each whole conversation. The loss is Bradley-Terry, ``-log sigmoid(r_chosen - r_rejected)``,
plus ``center_coef * (r_chosen + r_rejected)^2``, which keeps scores near zero so that a score of
+2 means the same thing from one run to the next (a PPO reward's scale is its learning rate).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from .adapters import save_adapter
from .checkpoints import AtomicCheckpoints, hf_warmup
from .scoring.pairs import (LengthGroupedPairBatches, PackedPairCollator, install_packed_scorer, pair_scores,
                            pairwise_metrics, truncation_report)
from .scoring.stats import tie_half_accuracy
from .models import resolve_device, resolve_dtype

NO_LIMIT = 1 << 30  # a max_length of "no truncation"


def new_reward_model(model_cfg, lora_cfg):
    """The base as a 1-output sequence classifier with a fresh LoRA adapter; the score head
    (zero-initialised, so every pair starts as a tie) is trained in full."""
    from peft import get_peft_model

    from .models import load_base, lora_peft_config

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


def run_rm(cfg) -> dict:
    """Train on the (partitioned) training subsets, check on the validation split, evaluate on
    the held-out subsets at full length; write the adapter, eval.json, summary.json, plots."""
    import datasets

    from . import guards
    from .chat import tokenize_pair
    from .data import hold_out, load_preference_splits
    from .deps import transformers_internals
    from .runs import is_main_process, plot_metrics, start_run

    t0 = time.time()
    transformers_internals.check()  # before the run folder exists
    with start_run(cfg, "rm") as run:
        train_rows, eval_rows, _ = load_preference_splits(cfg.data)
        train_rows, val_rows = hold_out(train_rows, cfg.data.validation_pairs, cfg.data.seed)
        run.record(data={"train_pairs": len(train_rows), "validation_pairs": len(val_rows), "eval_pairs": len(eval_rows)})
        model, tok = new_reward_model(cfg.model, cfg.lora)
        t = cfg.train
        collator = PackedPairCollator(tok.pad_token_id, t.max_length, t.max_prompt_length)
        ds = datasets.Dataset.from_list([tokenize_pair(tok, r) for r in train_rows])
        cut = truncation_report(ds, t.max_length, t.max_prompt_length)
        print(f"training pairs: {cut['message']}")
        stop, guard = guards.GracefulStop(), guards.NonFiniteGuard(cfg.run.max_nonfinite_steps)
        trainer = PackedRewardTrainer(model=model, args=rm_args(cfg, str(run.path / "trainer")), train_dataset=ds,
                                      data_collator=collator, center_coef=t.center_coef,
                                      callbacks=[run.trainer_callback(), guards.trainer_callback(stop, guard)])
        trainer.align_run_path, trainer.align_keep_last = run.path, cfg.run.keep_last
        t_train = time.time()
        trainer.train_resumable(run, stop)
        train_seconds = time.time() - t_train
        if not is_main_process():
            return {}
        save_adapter(model, run.path / "adapter", cfg.model.name, tokenizer=tok)
        summary = {"train_pairs": len(ds), "epochs": t.epochs, "steps": trainer.state.global_step,
                   "train_seconds": round(train_seconds, 1),
                   "seconds_per_1000_pairs": round(1000 * train_seconds / max(1, len(ds) * t.epochs), 1),
                   "truncation": {k: v for k, v in cut.items() if k != "message"}, "adapter": str(run.path / "adapter"),
                   "nonfinite_steps_skipped": guard.skipped, "resumed_from": str(run.resume_from or "")}
        summary.update(_evaluate(cfg, run, model, tok, val_rows, eval_rows))
        summary["wall_seconds"] = round(time.time() - t0, 1)
        run.write_json("summary.json", summary)
        if cfg.run.plot:
            plot_metrics(run.read_metrics(), ["loss", "accuracy", "margin"], run.path / "plots.png", "reward model")
        return summary


def _evaluate(cfg, run, model, tok, val_rows, eval_rows) -> dict:
    """Pairwise accuracy (ties 1/2) on the validation split (training length) and on the
    held-out subsets (``train.eval_max_length``, 0 = untruncated)."""
    from .chat import tokenize_pair

    t, out = cfg.train, {}
    if val_rows:
        val = pair_scores(model, [tokenize_pair(tok, r) for r in val_rows],
                          PackedPairCollator(tok.pad_token_id, t.max_length, t.max_prompt_length), t.batch_size)
        out["validation"] = pairwise_metrics(val)
        print(f"validation pairwise accuracy ({len(val_rows)} pairs of the training subsets): "
              f"{out['validation']['pairwise_accuracy']:.3f}")
    if cfg.evaluate and eval_rows:
        limit = t.eval_max_length or NO_LIMIT
        te = time.time()
        scores = pair_scores(model, [tokenize_pair(tok, r) for r in eval_rows],
                             PackedPairCollator(tok.pad_token_id, limit, limit - 1), t.batch_size)
        ev = {**pairwise_metrics(scores), "eval_subsets": cfg.data.eval_subsets,
              "max_length": t.eval_max_length or "untruncated", "eval_seconds": round(time.time() - te, 1)}
        run.write_json("eval.json", ev)
        run.log({"step": -1, **{f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)}})
        out["eval"] = ev
        print(f"held-out pairwise accuracy ({', '.join(cfg.data.eval_subsets)}, {ev['pairs']} pairs, "
              f"{ev['max_length']}): {ev['pairwise_accuracy']:.3f}")
    return out
