"""`align dpo`: TRL DPO of a LoRA policy; the reference is the same base with adapters off."""
from __future__ import annotations

import contextlib
import time

from .heldout import evaluate

__all__ = ["run_dpo"]


def compute_report(model, tokens: dict, seconds: dict, stored: dict | None = None) -> dict:
    """Model FLOPs of each phase (counted by :mod:`align.compute`: every token of a packed row
    through the backbone, answer tokens only through the LM head; training = 2 forwards) and the
    rate reached, to compare with the machine's peak. ``tokens[split]`` = (packed, answers);
    ``stored``: reference phases read from the store, with the seconds computing them took."""
    from ..compute import device_peak_gflops, flop_counts, forward_gflop
    from ..placement import placement_of

    backbone, head = flop_counts(model)
    where = placement_of(model)
    peak = device_peak_gflops(where.torch_dtype, where.device)
    # phase: (the data it covers, forward-equivalents per token)
    phases = {"reference_train": ("train", 1), "train": ("train", 2),
              "reference_eval": ("eval", 1), "policy_eval": ("eval", 1)}
    out = {"backbone_params": backbone, "lm_head_params": head, "phases": {}}
    for phase, (split, n_pass) in phases.items():
        if phase not in seconds or split not in tokens:
            continue
        packed, answers = tokens[split]
        gflop = forward_gflop((backbone, head), packed, answers, passes=n_pass)
        sec = seconds[phase]
        out["phases"][phase] = {"seconds": round(sec, 1), "gflop": round(gflop, 3),
                                "gflop_per_s": round(gflop / sec, 1) if sec >= 1 else None,
                                "share_of_peak": round(gflop / sec / peak, 4) if sec > 0 else None}
    total_s = sum(p["seconds"] for p in out["phases"].values())
    total = sum(p["gflop"] for p in out["phases"].values())
    out["total_gflop"], out["gflop_per_s"] = round(total, 3), round(total / total_s, 1) if total_s >= 1 else None
    out.update(matmul_peak_gflop_per_s=round(peak, 1), peak_dtype=where.dtype, peak_device=str(where.device))
    if stored:
        out["read_from_store"] = {phase: {"computed_seconds": s} for phase, s in stored.items()}
    return out


def run_dpo(cfg) -> dict:
    """Train, then evaluate on the held-out subsets; every phase is timed for the compute block."""
    from .. import distributed, guards
    from ..adapters import adapter_weights, save_adapter
    from ..data import hold_out, load_preference_splits
    from ..models import add_policy_adapter, load_base
    from ..runs import after_job, is_main_process, plot_metrics, start_run
    from .heldout import cached_reference
    from .objectives import REFERENCE_FREE
    from ..deps import transformers_internals, trl_internals
    from ..scoring.pairs import truncation_report

    t0 = time.time()
    trl_internals.check()  # before the run folder exists: an incompatible TRL writes nothing
    transformers_internals.check()
    distributed.init(cfg.model.device)  # the process group before the run folder: its checks need it
    with start_run(cfg, "dpo") as run:
        train_rows, eval_rows, _ = load_preference_splits(cfg.data)
        # in-family validation: pairs of the training subsets never trained on (tune on these)
        train_rows, val_rows = hold_out(train_rows, cfg.data.validation_pairs if cfg.evaluate else 0, cfg.data.seed)
        run.record(data={"train_pairs": len(train_rows), "validation_pairs": len(val_rows),
                         "eval_pairs": len(eval_rows)})
        base, tok = load_base(cfg.model)
        model = add_policy_adapter(base, cfg.lora)
        model.print_trainable_parameters()
        stop, guard = guards.GracefulStop(), guards.NonFiniteGuard(cfg.run.max_nonfinite_steps)
        trainer = _trainer(cfg, run, model, tok, train_rows, stop, guard)
        run.record(parallelism=distributed.trainer_parallelism(trainer))
        cut = truncation_report(trainer.train_dataset, cfg.train.max_length, cfg.train.max_prompt_length)
        print(f"training pairs: {cut['message']}")
        seconds, tokens = {}, {"train": (cut["packed_tokens"], cut["answer_tokens"])}
        stored = {}  # phase: seconds its reference pass took when it was computed (read from the store now)
        device = model.device
        if cfg.train.objective in REFERENCE_FREE:  # nothing of the reference enters the loss
            print(f"train.objective={cfg.train.objective}: reference-free, no reference pass over the training pairs")
        else:
            with _timed(seconds, "reference_train", device):
                ref, said = cached_reference(run, "train", model, trainer.train_dataset, trainer.data_collator,
                                             cfg.train.batch_size, cfg.train.reference_cache)
                trainer.attach_reference_logps(ref)
            _read_from_store(seconds, "reference_train", said, stored)
        held_out = _prepare_eval(cfg, run, trainer, tok, eval_rows, seconds, tokens, stored)
        validation = _prepare_eval(cfg, run, trainer, tok, val_rows, seconds, tokens, stored, split="validation")
        with _timed(seconds, "train", device):
            trainer.train_resumable(run, stop)
        adapter_dir = run.path / "adapter"
        weights = adapter_weights(model)  # on every rank: sharded weights (FSDP) are gathered
        if is_main_process():
            save_adapter(model, adapter_dir, cfg.model.name, state_dict=weights)
        summary = {"train_pairs": len(train_rows), "train_seconds": round(seconds["train"], 1),
                   "steps": trainer.state.global_step, "adapter": str(adapter_dir),
                   "nonfinite_steps_skipped": guard.skipped, "resumed_from": str(run.resume_from or ""),
                   "truncation": {k: v for k, v in cut.items() if k != "message"}}
        # every rank evaluates (only rank 0 writes): with sharded weights each forward needs all
        if validation is not None:
            summary["validation"] = _final_eval(cfg, run, trainer, *validation, split="validation")
        if held_out is not None:
            with _timed(seconds, "policy_eval", device):
                summary["eval"] = _final_eval(cfg, run, trainer, *held_out)
        summary["compute"] = compute_report(model, tokens, seconds, stored)
        summary["wall_seconds"] = round(time.time() - t0, 1)
        if not is_main_process():
            return summary
        summary.update(after_job(cfg, run.path))
        run.write_json("summary.json", summary)
        if cfg.run.plot:
            plot_metrics(run.read_metrics(), ["loss", "rewards/accuracies", "rewards/margins"],
                         run.path / "plots.png", title=f"DPO {cfg.model.name}")
        _print_summary(summary)
        return summary


@contextlib.contextmanager
def _timed(seconds: dict, phase: str, device=None):
    """Wall seconds of a phase, the device synchronised at both ends (queued GPU work belongs
    to the phase that launched it)."""
    from ..placement import synchronize

    synchronize(device)
    t = time.time()
    yield
    synchronize(device)
    seconds[phase] = time.time() - t


def _as_dataset(rows, objective: str = "dpo", seed: int = 0):
    """The trainer's rows: pairs, or for KTO the unpaired rows packed as pairs whose first answer
    is the row's own and whose second is a mismatched one (its KL term)."""
    import datasets

    if objective == "kto":
        from .objectives import kto_rows

        return datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["mismatched"],
                                            "label": r["label"]} for r in kto_rows(rows, seed)])
    return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def _trainer(cfg, run, model, tok, train_rows, stop, guard):
    from .. import guards
    from .trainer import PackedDPOTrainer, dpo_args

    trainer = PackedDPOTrainer(
        model=model, args=dpo_args(cfg, str(run.path / "trainer")),
        train_dataset=_as_dataset(train_rows, cfg.train.objective, cfg.data.seed),
        processing_class=tok, max_length=cfg.train.max_length, max_prompt_length=cfg.train.max_prompt_length,
        objective=cfg.train.objective, train_cfg=cfg.train,
        callbacks=[run.trainer_callback(), guards.trainer_callback(stop, guard)],
    )
    trainer.align_run_path, trainer.align_keep_last = run.path, cfg.run.keep_last
    return trainer


def _read_from_store(seconds: dict, phase: str, said: dict, stored: dict) -> None:
    """A reference pass read from the store did no work: its phase leaves the compute block
    (its rate would be meaningless) and is listed with what computing it took."""
    if said.get("hit"):
        seconds.pop(phase, None)
        stored[phase] = said["computed_seconds"]


def _prepare_eval(cfg, run, trainer, tok, eval_rows, seconds, tokens, stored, split: str = "eval"):
    """Tokenized held-out pairs and their reference scores (before training: the reference
    pass runs while the adapter is still untouched, and is cached for a resumed run). ``split``:
    ``eval`` (the evaluation subsets, off the training family) or ``validation`` (held out of
    the training pairs: in family); only ``eval`` counts in the compute block."""
    from .heldout import cached_reference
    import datasets

    from ..chat import tokenize_pair
    from ..scoring.pairs import truncation_report

    if not (cfg.evaluate and eval_rows):
        return None
    # The pair tokenization training data gets from TRL (chat.tokenize_pair reproduces it; tested).
    eval_ds = datasets.Dataset.from_list([tokenize_pair(tok, r) for r in eval_rows])
    collator = trainer.data_collator if split != "eval" else eval_collator(cfg.train, tok.pad_token_id)
    eval_cut = truncation_report(eval_ds, collator.max_length, collator.max_prompt_length)
    spent = seconds if split == "eval" else {}
    if split == "eval":
        tokens["eval"] = (eval_cut["packed_tokens"], eval_cut["answer_tokens"])
    with _timed(spent, "reference_eval", trainer.model.device):
        ref_scores, said = cached_reference(run, split, trainer.model, eval_ds, collator, cfg.train.batch_size,
                                            cfg.train.reference_cache)
    _read_from_store(spent, "reference_eval", said, stored if split == "eval" else {})
    return eval_ds, ref_scores, collator


def eval_collator(train_cfg, pad_token_id: int):
    """The held-out (off-family) pairs' truncation, ``train.eval_max_length``: as in training
    (-1), untruncated (0), or N tokens with the prompt at most half of them."""
    from ..scoring.pairs import NO_LIMIT, PackedPairCollator

    n = train_cfg.eval_max_length
    if n < 0:
        return PackedPairCollator(pad_token_id, train_cfg.max_length, train_cfg.max_prompt_length)
    if n == 0:
        return PackedPairCollator(pad_token_id, NO_LIMIT, NO_LIMIT - 1)
    return PackedPairCollator(pad_token_id, n, max(1, n // 2))


def _final_eval(cfg, run, trainer, eval_ds, ref_scores, collator, split: str = "eval") -> dict:
    t = time.time()
    result = evaluate(trainer.model, eval_ds, collator, cfg.train.beta, ref_scores,
                      cfg.train.batch_size)
    run.write_json(f"{split}_per_pair.json", result.pop("per_pair"))  # for paired intervals between runs
    if split == "eval":
        result["eval_subsets"] = cfg.data.eval_subsets or [cfg.data.eval_split]
        n = cfg.train.eval_max_length
        result["max_length"] = "as training" if n < 0 else n or "untruncated"
    else:
        result["held_out_of"] = cfg.data.train_subsets or [cfg.data.train_split]
    result["eval_seconds"] = round(time.time() - t, 1)
    run.write_json("eval.json" if split == "eval" else f"{split}.json", result)
    run.log({"step": trainer.state.global_step, **{f"{split}/{k}": v for k, v in result.items()
                                                    if isinstance(v, (int, float))}})
    return result


def _print_summary(s: dict) -> None:
    print("\n== DPO summary ==")
    print(f"trained on {s['train_pairs']} pairs in {s['steps']} steps, {s['train_seconds']:.0f}s;"
          f" total wall {s['wall_seconds']:.0f}s")
    if "eval" in s:
        e = s["eval"]
        print(f"held-out ({', '.join(e['eval_subsets'])}, {e['pairs']} pairs): implicit accuracy "
              f"{e['implicit_accuracy']:.3f}, mean margin {e['mean_margin']:.3f}")
        print(f"reference-free accuracy: base {e['reference_free_accuracy_base']:.3f} -> "
              f"policy {e['reference_free_accuracy_policy']:.3f}")
    c = s["compute"]
    print(f"compute: {c['total_gflop']:,.0f} GFLOP (model FLOPs, attention left out) at "
          f"{c['gflop_per_s']} GFLOP/s over the timed phases")
    print(f"adapter: {s['adapter']}")
