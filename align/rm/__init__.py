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

from ..adapters import adapter_weights, save_adapter
from ..scoring.pairs import PackedPairCollator, truncation_report
from .heldout import evaluate
from .trainer import PackedRewardTrainer, new_reward_model, pair_loss, rm_args

__all__ = ["run_rm", "new_reward_model", "pair_loss", "rm_args", "PackedRewardTrainer", "evaluate"]


def run_rm(cfg) -> dict:
    """Train on the (partitioned) training subsets, check on the validation split, evaluate on
    the held-out subsets at full length; write the adapter, eval.json, summary.json, plots."""
    import datasets

    from .. import guards
    from ..chat import tokenize_pair
    from ..data import hold_out, load_preference_splits
    from ..deps import transformers_internals
    from ..runs import is_main_process, plot_metrics, start_run

    from .. import distributed

    t0 = time.time()
    transformers_internals.check()  # before the run folder exists
    distributed.init(cfg.model.device)  # the process group before the run folder: its checks need it
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
        run.record(parallelism=distributed.trainer_parallelism(trainer))
        t_train = time.time()
        trainer.train_resumable(run, stop)
        train_seconds = time.time() - t_train
        weights = adapter_weights(model)  # on every rank: sharded weights (FSDP) are gathered
        if is_main_process():
            save_adapter(model, run.path / "adapter", cfg.model.name, tokenizer=tok, state_dict=weights)
        summary = {"train_pairs": len(ds), "epochs": t.epochs, "steps": trainer.state.global_step,
                   "train_seconds": round(train_seconds, 1),
                   "seconds_per_1000_pairs": round(1000 * train_seconds / max(1, len(ds) * t.epochs), 1),
                   "truncation": {k: v for k, v in cut.items() if k != "message"}, "adapter": str(run.path / "adapter"),
                   "nonfinite_steps_skipped": guard.skipped, "resumed_from": str(run.resume_from or "")}
        # every rank evaluates (only rank 0 writes): with sharded weights each forward needs all
        summary.update(evaluate(cfg, run, model, tok, val_rows, eval_rows))
        if not is_main_process():
            return {}
        summary["wall_seconds"] = round(time.time() - t0, 1)
        run.write_json("summary.json", summary)
        if cfg.run.plot:
            plot_metrics(run.read_metrics(), ["loss", "accuracy", "margin"], run.path / "plots.png", "reward model")
        return summary


