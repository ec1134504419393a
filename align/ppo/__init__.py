"""`align ppo`: PPO with a custom reward; policy, reference and critic on one frozen base."""
from __future__ import annotations

import time

__all__ = ["run_ppo", "build_engine"]


def build_engine(cfg, ac, tok, run=None):
    if cfg.rollout.engine == "hf":
        from ..rollout.hf import HFEngine

        return HFEngine(ac.model, tok)
    if cfg.rollout.engine == "vllm-server":
        from .. import distributed
        from ..assets import resolve_model
        from ..rollout.vllm_server import VLLMServerEngine

        log = run.path / f"vllm-server-rank{distributed.rank()}.log" if run is not None else None
        engine = VLLMServerEngine(resolve_model(cfg.model.name), tok, max_lora_rank=cfg.lora.r,
                                  base_name=cfg.model.name, log_path=log,
                                  devices=cfg.rollout.server_devices or None)
        engine.sync(ac.model, 0)
        return engine
    from ..rollout.vllm_engine import VLLMEngine  # imports vLLM only here

    return VLLMEngine.from_config(cfg, ac.model, tok)


def run_ppo(cfg) -> dict:
    from ..data.prompts import load_prompts
    from ..dpo import save_adapter
    from ..models import load_base
    from ..runs import plot_metrics, start_run
    from .actor_critic import ActorCritic
    from .trainer import train_ppo

    from .. import distributed
    from ..config import ConfigError

    distributed.init()
    world = distributed.world_size()
    for key in ("prompts_per_iteration", "minibatch_size"):
        if getattr(cfg.ppo, key) % world:
            raise ConfigError(f"key 'ppo.{key}' ({getattr(cfg.ppo, key)}) must be divisible by the "
                              f"number of processes ({world}): each takes an equal share")
    t0 = time.time()
    run = start_run(cfg, "ppo")
    train_prompts, eval_prompts = load_prompts(cfg.data)
    print(f"prompts: {len(train_prompts)} train, {len(eval_prompts)} held out")
    base, tok = load_base(cfg.model)
    ac = ActorCritic(base, cfg.lora, with_critic=cfg.ppo.advantage == "gae").to(distributed.device())
    engine = build_engine(cfg, ac, tok, run)
    try:
        summary = train_ppo(ac, engine, tok, train_prompts, eval_prompts, cfg, run)
    finally:
        engine.close()
    if distributed.rank() != 0:
        return summary
    summary["adapter"] = str(save_adapter(ac.model, run.path / "adapter", cfg.model.name))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    summary["engine"] = cfg.rollout.engine
    summary["processes"] = world
    run.write_json("summary.json", summary)
    if cfg.run.plot:
        plot_metrics(run.read_metrics(), ["reward_mean", "eval/reward_mean", "kl_per_answer",
                                          "eval/kl_per_answer", "entropy", "clipfrac"],
                     run.path / "plots.png", title=f"PPO {cfg.model.name} ({cfg.ppo.advantage})")
    print("\n== PPO summary ==")
    if "eval_final" in summary:
        i, f = summary["eval_initial"], summary["eval_final"]
        print(f"held-out reward {i['reward_mean']:.3f} ± {i['reward_std']:.3f} -> {f['reward_mean']:.3f} "
              f"({summary['reward_gain_in_initial_std']:+.2f} initial std), KL/answer {f['kl_per_answer']:.2f}")
    print(f"{summary['iterations']} iterations in {summary['train_seconds']:.0f}s; adapter: {summary['adapter']}")
    return summary
