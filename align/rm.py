"""`align rm`: a LoRA reward model on preference pairs with TRL's RewardTrainer.

The model is the base as a sequence classifier (one scalar); LoRA on all linear layers plus a
trainable score head (PEFT's ``modules_to_save``). Held-out pairwise accuracy (ties 1/2) is
measured on subsets never trained on. The saved adapter is usable directly as a PPO reward:
``reward.function=reward.model:score`` with ``ALIGN_REWARD_MODEL=runs/<rm-run>/adapter``.
"""
from __future__ import annotations

import time

from reward.model import score_texts

from .adapters import save_adapter
from .chat import chat_text
from .models import resolve_device, resolve_dtype


def new_reward_model(model_cfg, lora_cfg):
    """The base as a 1-output sequence classifier with a fresh LoRA adapter (score head trained
    in full through PEFT's ``modules_to_save``)."""
    from peft import get_peft_model

    from .models import load_base, lora_peft_config

    base, tok = load_base(model_cfg, kind="classifier")
    return get_peft_model(base, lora_peft_config(lora_cfg, task_type="SEQ_CLS")), tok


def render_pair(tok, row) -> tuple[str, str]:
    if isinstance(row["prompt"], str):
        return row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
    return chat_text(tok, row["prompt"] + row["chosen"]), chat_text(tok, row["prompt"] + row["rejected"])


def pairwise_accuracy(model, tok, rows, max_length: int) -> dict:
    pairs = [render_pair(tok, r) for r in rows]
    c = score_texts(model, tok, [p[0] for p in pairs], max_length=max_length)
    r = score_texts(model, tok, [p[1] for p in pairs], max_length=max_length)
    d = c - r
    return {"pairs": len(rows), "pairwise_accuracy": float(((d > 0).float() + 0.5 * (d == 0).float()).mean()),
            "mean_margin": float(d.mean())}


def run_rm(cfg) -> dict:
    import datasets
    from trl import RewardConfig, RewardTrainer

    from . import guards
    from .checkpoints import AtomicCheckpoints
    from .data import load_preference_splits
    from .runs import is_main_process, plot_metrics, start_run

    class AlignRewardTrainer(AtomicCheckpoints, RewardTrainer):
        pass

    t0 = time.time()
    with start_run(cfg, "rm") as run:
        train_rows, eval_rows, _ = load_preference_splits(cfg.data)
        model, tok = new_reward_model(cfg.model, cfg.lora)
        t = cfg.train
        args = RewardConfig(
            output_dir=str(run.path / "trainer"), per_device_train_batch_size=t.batch_size,
            learning_rate=t.learning_rate, num_train_epochs=t.epochs,
            max_steps=t.max_steps if t.max_steps > 0 else -1, warmup_steps=t.warmup_ratio,
            max_grad_norm=t.max_grad_norm, max_length=t.max_length, logging_steps=cfg.run.log_every,
            save_strategy="steps" if cfg.run.save_every else "no", save_steps=cfg.run.save_every or 500,
            report_to=cfg.run.report_to or "none", use_cpu=resolve_device(cfg.model.device).type == "cpu",
            bf16=resolve_dtype(cfg.model.dtype) == "bfloat16", fp16=resolve_dtype(cfg.model.dtype) == "float16", seed=cfg.run.seed, data_seed=cfg.data.seed,
            dataloader_num_workers=0)

        ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_rows])
        stop, guard = guards.GracefulStop(), guards.NonFiniteGuard(cfg.run.max_nonfinite_steps)
        trainer = AlignRewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                     callbacks=[run.trainer_callback(), guards.trainer_callback(stop, guard)])
        trainer.align_run_path, trainer.align_keep_last = run.path, cfg.run.keep_last
        dropped = len(ds) - len(trainer.train_dataset)  # TRL drops pairs longer than max_length
        print(f"training on {len(trainer.train_dataset)} pairs ({dropped} longer than "
              f"train.max_length={t.max_length} tokens were dropped by TRL)")
        if len(trainer.train_dataset) == 0:
            raise ValueError(f"train.max_length={t.max_length}: every training pair is longer; raise it")
        trainer.train_resumable(run, stop)
        if not is_main_process():
            return {}
        save_adapter(trainer.model, run.path / "adapter", cfg.model.name, tokenizer=tok)
        summary = {"train_pairs": len(trainer.train_dataset), "dropped_too_long": dropped, "steps": trainer.state.global_step,
                   "train_seconds": round(time.time() - t0, 1), "adapter": str(run.path / "adapter"),
                   "nonfinite_steps_skipped": guard.skipped, "resumed_from": str(run.resume_from or "")}
        if cfg.evaluate and eval_rows:
            ev = pairwise_accuracy(trainer.model, tok, eval_rows, t.max_length)
            ev["eval_subsets"] = cfg.data.eval_subsets
            run.write_json("eval.json", ev)
            summary["eval"] = ev
            print(f"held-out pairwise accuracy ({', '.join(cfg.data.eval_subsets)}, {ev['pairs']} pairs): "
                  f"{ev['pairwise_accuracy']:.3f}")
        run.write_json("summary.json", summary)
        if cfg.run.plot:
            plot_metrics(run.read_metrics(), ["loss", "accuracy", "margin"], run.path / "plots.png", "reward model")
        return summary
