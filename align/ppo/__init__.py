"""`align ppo`: PPO with a custom reward; policy, reference and critic on one frozen base."""
from __future__ import annotations

import os
import time

__all__ = ["run_ppo", "engine_options", "check_config"]


def check_config(cfg) -> None:
    """The checks that need PPO's own code (its registries); ConfigError names the key. Run
    before anything is written, and by ``align ppo --dry-run``."""
    from ..config import ConfigError
    from .advantages import get_estimator

    if get_estimator(cfg.ppo).needs_critic and cfg.ppo.loss_aggregation != "token-mean":
        raise ConfigError(f"key 'ppo.loss_aggregation': {cfg.ppo.loss_aggregation} is for critic-free "
                          "estimators (grpo, rloo); with gae the policy and value losses are token means")


def run_ppo(cfg) -> dict:
    """Check the choices, then: prompts -> base + roles -> rollout engine -> the loop -> adapter."""
    from .. import distributed
    from ..chat import encode_prompts
    from ..data.prompts import load_prompts
    from ..models import load_base
    from ..rollout import make_engine
    from ..runs import after_job, start_run
    from .advantages import get_estimator
    from .trainer import train_ppo

    check_config(cfg)  # an unknown estimator fails before anything is written
    estimator = get_estimator(cfg.ppo)
    parallelism = distributed.parallelism(cfg.ppo.parallelism)
    distributed.init(cfg.model.device, group=parallelism == "fsdp2")
    _check_divisible(cfg, distributed.world_size())
    _check_parallelism(cfg, parallelism)
    _server_devices(cfg)  # a split that cannot be made fails before the run folder exists
    t0 = time.time()
    with start_run(cfg, "ppo") as run:
        run.open_trackers(cfg.run.report_to, cfg)
        run.record(parallelism=parallelism)
        train_prompts, eval_prompts = load_prompts(cfg.data)
        print(f"prompts: {len(train_prompts)} train, {len(eval_prompts)} held out")
        run.record(data={"train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts)})
        base, tok = load_base(cfg.model)
        cut = encode_prompts(tok, train_prompts + eval_prompts, cfg.rollout.max_prompt_tokens)
        print(f"prompts: {cut} of {len(train_prompts) + len(eval_prompts)} are longer than "
              f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens} (their oldest tokens dropped)")
        ac = _policy(base, cfg, estimator)
        engine = make_engine(cfg.rollout.engine, engine_options(cfg, run), ac.model, tok)
        try:
            summary = train_ppo(ac, engine, tok, train_prompts, eval_prompts, cfg, run)
        finally:
            engine.close()
        from ..memory import held_parameters_gib, peak_memory

        # every rank's, in rank order
        memory = distributed.gather_objects({**peak_memory(ac.device), "parameters_gib": held_parameters_gib(ac)})
        policy = ac.adapter_state()  # gathered on every rank (FSDP2 shards); rank 0 writes
        if distributed.rank() != 0:
            return summary
        summary["peak_memory_per_rank"] = memory
        summary["adapter"] = str(ac.save_policy(run.path, cfg.model.name, tok, state=policy))
        summary["wall_seconds"] = round(time.time() - t0, 1)
        summary["engine"] = cfg.rollout.engine
        summary["processes"] = distributed.world_size()
        summary.update(after_job(cfg, run.path, held_out=eval_prompts))
        run.write_json("summary.json", summary)
        _report(cfg, run, summary)
        return summary


def _policy(base, cfg, estimator):
    """The trained roles on ``base``: LoRA adapters (:class:`ActorCritic`), or with ``lora.r:
    full`` the whole model and a frozen reference copy -- refused before the copy is made where
    the device's free memory would not hold it."""
    from ..config import ConfigError
    from ..memory import available_bytes, full_finetuning_bytes
    from ..placement import resolve_device
    from .actor_critic import ActorCritic, FullFineTuning

    device = resolve_device(cfg.model.device)
    if cfg.lora.r != "full":
        return ActorCritic(base, cfg.lora, with_critic=estimator.needs_critic, critic=cfg.ppo.critic).to(device)
    need, free = full_finetuning_bytes(base), available_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ConfigError(f"key 'lora.r': full fine-tuning of {cfg.model.name} needs ~{need / 2**30:.1f} GiB more "
                          f"(a reference copy, gradients, Adam's moments) and {device} has {free / 2**30:.1f} GiB "
                          "free; train an adapter instead (e.g. lora.r=8)")
    print(f"full fine-tuning: every weight trains; the reference is a frozen copy (+{need / 2**30:.1f} GiB)")
    return FullFineTuning(base).to(device)


def engine_options(cfg, run):
    """What the rollout engine needs from the job's config."""
    from ..assets import resolve_model
    from ..placement import place
    from ..rollout.base import EngineOptions

    where = place(cfg.model.device, cfg.model.dtype)
    return EngineOptions(base_path=resolve_model(cfg.model.name), base_name=cfg.model.name,
                         dtype=where.dtype, device=str(where.device), memory_fraction=cfg.rollout.gpu_memory_fraction,
                         max_lora_rank=cfg.lora.r if cfg.lora.r != "full" else 8, seed=cfg.run.seed, sync=cfg.rollout.sync,
                         max_model_len=cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens,
                         host=cfg.rollout.server_host, api_key=cfg.rollout.server_api_key,
                         server_devices=_server_devices(cfg),
                         log_dir=str(run.path) if run is not None else None)


def _server_devices(cfg) -> str:
    """This process's share of rollout.server_devices (vllm-server only; one server per process)."""
    from ..config import ConfigError
    from ..placement import server_devices_of_rank

    if cfg.rollout.engine != "vllm-server":
        return cfg.rollout.server_devices
    try:
        return server_devices_of_rank(cfg.rollout.server_devices)
    except ValueError as e:
        raise ConfigError(f"key 'rollout.server_devices': {e}") from None


def _check_parallelism(cfg, parallelism: str) -> None:
    """What FSDP2 cannot do without gathering the whole base (the failure it exists to avoid)."""
    from ..config import ConfigError

    if parallelism == "single" and cfg.ppo.parallelism != "auto":
        print(f"notice: ppo.parallelism={cfg.ppo.parallelism} has no effect with one process")
    if parallelism == "ddp" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        print("notice: PPO's own loop does not run on DeepSpeed; the launcher's DeepSpeed config is ignored "
              "and the adapters train under DDP (configs/accelerate/fsdp.yaml shards the base)")
    if parallelism != "fsdp2":
        return
    if cfg.lora.r == "full":
        raise ConfigError("key 'ppo.parallelism': fsdp2 shards a frozen base under trained adapters; with "
                          "lora.r=full (every weight trains, a tied head and embedding) use ddp")
    if cfg.rollout.engine != "hf" and cfg.rollout.sync != "lora":
        raise ConfigError(f"key 'rollout.sync': {cfg.rollout.sync} may merge the adapter into whole base weights, "
                          "which under fsdp2 would gather the sharded base at every sync; use rollout.sync=lora "
                          "(only the adapter moves)")


def _check_divisible(cfg, world: int) -> None:
    from ..config import ConfigError

    for key in ("prompts_per_iteration", "minibatch_size"):
        if getattr(cfg.ppo, key) % world:
            raise ConfigError(f"key 'ppo.{key}' ({getattr(cfg.ppo, key)}) must be divisible by the "
                              f"number of processes ({world}): each takes an equal share")


def _report(cfg, run, summary: dict) -> None:
    from ..runs import plot_accuracy, plot_heldout_vs_kl, plot_metrics

    if cfg.run.plot:
        plot_heldout_vs_kl(run.read_metrics(), run.path / "heldout_vs_kl.png")
        plot_accuracy(run.read_metrics(), run.path / "accuracy.png", title=f"PPO {cfg.model.name} ({cfg.ppo.advantage})")
        plot_metrics(run.read_metrics(), ["reward_mean", "eval/reward_mean", "kl_per_answer",
                                          "eval/kl_per_answer", "entropy", "clipfrac"],
                     run.path / "plots.png", title=f"PPO {cfg.model.name} ({cfg.ppo.advantage})")
    print("\n== PPO summary ==")
    if "eval_final" in summary and "eval_initial" in summary:
        i, f = summary["eval_initial"], summary["eval_final"]
        if "reward_mean" in f:
            print(f"held-out reward {i['reward_mean']:.3f} ± {i['reward_std']:.3f} -> {f['reward_mean']:.3f} "
                  f"({summary['reward_gain_in_initial_std']:+.2f} initial std), KL/answer {f['kl_per_answer']:.2f}")
        for mode in [m for m in f.get("accuracy", {}) if m in i.get("accuracy", {})]:
            a, b = i["accuracy"][mode], f["accuracy"][mode]
            print(f"held-out {'greedy accuracy' if mode == 'greedy' else mode} on {b['n']} prompts: " + "; ".join(
                f"{g} {100 * a[g]:.1f} % -> {100 * b[g]:.1f} % [{100 * b[g + '_ci95'][0]:.1f}, {100 * b[g + '_ci95'][1]:.1f}]"
                for g in ("strict", "lenient")))
    change = summary.get("accuracy_change")
    if change:
        print(f"held-out greedy accuracy change, paired on the same {change['lenient']['n']} problems "
              f"(iteration {change['from_iteration']} -> {change['to_iteration']}): " + "; ".join(
                  f"{g} {100 * change[g]['difference']:+.1f} points [{100 * change[g]['ci95'][0]:+.1f}, "
                  f"{100 * change[g]['ci95'][1]:+.1f}]" for g in ("strict", "lenient")))
    sbs = summary.get("side_by_side") or {}
    for who in ("reward", "judge"):
        if f"{who}_win_rate" in sbs:
            lo, hi = sbs[f"{who}_win_rate_ci95"]
            print(f"{who} prefers the policy's answer to the base's on {100 * sbs[f'{who}_win_rate']:.1f} % "
                  f"[{100 * lo:.1f}, {100 * hi:.1f}] of {sbs['prompts']} held-out prompts")
    print(f"{summary['iterations']} iterations in {summary['train_seconds']:.0f}s; adapter: {summary['adapter']}")
