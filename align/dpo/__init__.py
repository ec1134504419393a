"""`align dpo`: TRL DPO of a LoRA policy; the reference is the same base with adapters off."""
from __future__ import annotations

import time

from .evaluate import evaluate, score_reference

__all__ = ["run_dpo"]


def save_adapter(peft_model, out_dir, base_name: str, adapter_name: str = "default"):
    """Write the adapter as a standard PEFT folder (safetensors), atomically, naming the base
    as users know it. The config is patched after saving: handing PEFT a Hub id makes it look the
    base up on the Hub at every save (every PPO sync)."""
    import json

    from ..runs import atomic_dir, atomic_write_text

    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2))
    return out_dir


def cached_reference(run, split: str, compute):
    """Reference log-probs of a split, computed once per run and kept in the run folder, so a
    resumed run does not pay for them again (they depend only on the base and the data)."""
    import dataclasses

    import torch

    from ..runs import is_main_process
    from .evaluate import PairScores

    from .. import distributed

    path = run.path / f"reference_logps_{split}.pt"
    if run.resume_from is not None and path.exists():
        print(f"reference scores for {split}: reusing {path}")
        return PairScores(**torch.load(path))
    t = time.time()
    scores = compute()
    print(f"reference scores for {split} ({len(scores.chosen_logp)} pairs) in {time.time() - t:.0f}s")
    distributed.barrier()  # rank 0 may be about to write the file the others would read
    if is_main_process():
        tmp = path.with_suffix(".tmp")
        torch.save(dataclasses.asdict(scores), tmp)
        tmp.replace(path)
    return scores


def score_sharded(model, dataset, collator, batch_size: int):
    """Reference scores of every pair; with N processes each scores every N-th pair and the
    shares are gathered, so the one-off reference pass is N times shorter, not repeated N times."""
    import torch

    from .. import distributed
    from .evaluate import PairScores

    world, rank = distributed.world_size(), distributed.rank()
    if world == 1:
        return score_reference(model, dataset, collator, batch_size)
    mine = score_reference(model, dataset.select(range(rank, len(dataset), world)), collator, batch_size)
    shares = distributed.gather_objects({k: v.tolist() for k, v in vars(mine).items()})
    out = {}
    for k in vars(mine):
        full = torch.empty(len(dataset), dtype=getattr(mine, k).dtype)
        for r, share in enumerate(shares):
            full[r::world] = torch.tensor(share[k], dtype=full.dtype)
        out[k] = full
    return PairScores(**out)


def compute_report(model, tokens: dict, seconds: dict) -> dict:
    """Model FLOPs of each phase and the rate reached, to compare with the machine's peak.

    Forward FLOPs per token: 2 x the backbone's weights (all tokens of a packed row) plus 2 x the
    LM head's (answer tokens only); attention scores are left out (a few % at these lengths).
    Training costs 2 forwards: the backward computes activation gradients only, the base being
    frozen (the LoRA weight gradients are ~4% of that). ``tokens[phase]`` = (packed, answers)."""
    base = model.get_base_model()
    head = base.get_output_embeddings().weight.numel()
    backbone = sum(p.numel() for n, p in base.named_parameters()
                   if "lora_" not in n and "embed_tokens" not in n and "lm_head" not in n)
    # phase: (the data it covers, forward-equivalents per token)
    phases = {"reference_train": ("train", 1), "train": ("train", 2),
              "reference_eval": ("eval", 1), "policy_eval": ("eval", 1)}
    out = {"backbone_params": backbone, "lm_head_params": head, "phases": {}}
    for phase, (split, n_pass) in phases.items():
        if phase not in seconds or split not in tokens:
            continue
        packed, answers = tokens[split]
        gflop = n_pass * (2 * backbone * packed + 2 * head * answers) / 1e9
        sec = seconds[phase]
        out["phases"][phase] = {"seconds": round(sec, 1), "gflop": round(gflop, 3),
                                "gflop_per_s": round(gflop / sec, 1) if sec >= 1 else None}
    total_s = sum(p["seconds"] for p in out["phases"].values())
    total = sum(p["gflop"] for p in out["phases"].values())
    out["total_gflop"], out["gflop_per_s"] = round(total, 3), round(total / total_s, 1) if total_s >= 1 else None
    return out


def run_dpo(cfg) -> dict:
    import datasets

    from .. import guards
    from ..data import load_preference_splits
    from ..guards import GracefulStop, NonFiniteGuard
    from ..models import add_policy_adapter, load_base
    from ..runs import is_main_process, plot_metrics, start_run
    from .packing import truncation_report
    from .trainer import PackedDPOTrainer, dpo_args

    t0 = time.time()
    run = start_run(cfg, "dpo")
    train_rows, eval_rows, _ = load_preference_splits(cfg.data)

    base, tok = load_base(cfg.model)
    model = add_policy_adapter(base, cfg.lora)
    model.print_trainable_parameters()

    def to_ds(rows):
        return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                           for r in rows])

    args = dpo_args(cfg, str(run.path / "trainer"))
    stop, guard = GracefulStop(), NonFiniteGuard(cfg.run.max_nonfinite_steps)
    trainer = PackedDPOTrainer(
        model=model, args=args, train_dataset=to_ds(train_rows), processing_class=tok,
        max_length=cfg.train.max_length, max_prompt_length=cfg.train.max_prompt_length,
        callbacks=[run.trainer_callback(), guards.trainer_callback(stop, guard)],
    )
    trainer.align_run_path, trainer.align_keep_last = run.path, cfg.run.keep_last
    cut = truncation_report(trainer.train_dataset, cfg.train.max_length, cfg.train.max_prompt_length)
    print(f"training pairs: {cut['message']}")
    collator = trainer.data_collator
    seconds = {}
    tokens = {"train": (cut["packed_tokens"], cut["answer_tokens"])}
    t = time.time()
    train_ref = cached_reference(run, "train", lambda: score_sharded(
        model, trainer.train_dataset, collator, cfg.train.batch_size))
    seconds["reference_train"] = time.time() - t
    trainer.attach_reference_logps(train_ref)
    eval_ds = ref_scores = None
    if cfg.evaluate and eval_rows:
        eval_ds = trainer._prepare_dataset(to_ds(eval_rows), tok, args, "eval")
        eval_cut = truncation_report(eval_ds, cfg.train.max_length, cfg.train.max_prompt_length)
        tokens["eval"] = (eval_cut["packed_tokens"], eval_cut["answer_tokens"])
        t = time.time()
        ref_scores = cached_reference(run, "eval", lambda: score_sharded(
            model, eval_ds, collator, cfg.train.batch_size))
        seconds["reference_eval"] = time.time() - t

    t_train = time.time()
    trainer.train_resumable(run, stop)
    train_seconds = seconds["train"] = time.time() - t_train
    adapter_dir = run.path / "adapter"
    if is_main_process():
        save_adapter(model, adapter_dir, cfg.model.name)

    summary = {"train_pairs": len(train_rows), "train_seconds": round(train_seconds, 1),
               "steps": trainer.state.global_step, "adapter": str(adapter_dir),
               "nonfinite_steps_skipped": guard.skipped, "resumed_from": str(run.resume_from or ""),
               "truncation": {k: v for k, v in cut.items() if k != "message"}}
    if eval_ds is not None and is_main_process():
        t_eval = time.time()
        result = evaluate(model, eval_ds, collator, cfg.train.beta, ref_scores, cfg.train.batch_size)
        result["eval_subsets"] = cfg.data.eval_subsets or [cfg.data.eval_split]
        result["eval_seconds"] = round(time.time() - t_eval, 1)
        seconds["policy_eval"] = time.time() - t_eval
        run.write_json("eval.json", result)
        run.log({"step": trainer.state.global_step, **{f"eval/{k}": v for k, v in result.items()
                                                        if isinstance(v, (int, float))}})
        summary["eval"] = result
    summary["compute"] = compute_report(model, tokens, seconds)
    summary["wall_seconds"] = round(time.time() - t0, 1)
    if not is_main_process():
        return summary
    run.write_json("summary.json", summary)
    if cfg.run.plot:
        plot_metrics(run.read_metrics(), ["loss", "rewards/accuracies", "rewards/margins"],
                     run.path / "plots.png", title=f"DPO {cfg.model.name}")
    _print_summary(summary)
    return summary


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
