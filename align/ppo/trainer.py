"""The PPO update and the loop, top to bottom: make experience, update, sync the engine, log."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from reward.api import load_reward_fn

from .. import distributed
from ..checkpoints import publish, stage_dir
from ..guards import GracefulStop, Interrupted, NonFiniteGuard, grads_finite
from ..rollout.base import SamplingConfig
from . import losses
from .experience import Experience, make_experience


def ppo_update(ac, exp: Experience, optimizer, cfg, guard=None, it: int = 0) -> dict:
    """Several epochs of minibatch updates on one batch; stops early on approx-KL. A minibatch
    with a NaN/inf loss or gradient makes no update (``guard`` counts it).

    With N data-parallel ranks each holds 1/N of the batch and of every minibatch; each local
    token-mean loss is scaled by (local tokens / global tokens) x N, so the averaged gradient
    is that of the global minibatch's token mean -- what one process would compute."""
    p = cfg.ppo
    world = distributed.world_size()
    mb_size = p.minibatch_size // world
    stats: dict[str, list[float]] = {k: [] for k in
                                     ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")}
    params = ac.policy_parameters() + ac.value_parameters()
    ac.train()
    epochs_done = 0
    for epoch in range(p.ppo_epochs):
        perm = torch.randperm(len(exp))
        epoch_kl = []
        for start in range(0, len(exp), mb_size):
            mb = exp.select(perm[start:start + mb_size])
            tokens = mb.mask.sum()
            scale = float(tokens * world / distributed.all_sum(tokens).clamp(min=1))
            with ac.role("policy"):
                logp, entropy = ac.token_logprobs(mb.input_ids, mb.attention_mask, mb.pred_pos,
                                                  mb.targets, with_entropy=True)
            pl, info = losses.policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, p.clip_range)
            ent = losses.masked_mean(entropy, mb.mask)
            loss = pl - p.entropy_coef * ent
            if p.advantage == "gae":
                v = ac.values(mb.input_ids, mb.attention_mask, mb.pred_pos)
                vl, _ = losses.value_loss(v, mb.values, mb.returns, mb.mask, p.value_clip_range)
                loss = loss + p.vf_coef * vl
                stats["value_loss"].append(float(vl.detach()) * scale)
            optimizer.zero_grad(set_to_none=True)
            (loss * scale).backward()  # a NaN loss gives NaN gradients: caught below, on every rank
            distributed.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)
            if not grads_finite(params):
                (guard or NonFiniteGuard(0)).skip(
                    params, f"iteration {it}, epoch {epoch}, minibatch {start // mb_size}")
                continue
            optimizer.step()
            stats["policy_loss"].append(float(pl.detach()) * scale)
            stats["entropy"].append(float(ent.detach()) * scale)
            stats["clipfrac"].append(float(info["clipfrac"]) * scale)
            stats["approx_kl"].append(float(info["approx_kl"]) * scale)
            epoch_kl.append(float(info["approx_kl"]) * scale)
        epochs_done += 1
        mean_kl = distributed.all_mean(sum(epoch_kl) / len(epoch_kl)) if epoch_kl else 0.0
        if p.target_approx_kl and mean_kl > p.target_approx_kl:  # the same decision on every rank
            break
    out = {k: distributed.all_mean(sum(v) / len(v)) for k, v in stats.items() if v}
    out["ppo_epochs_done"] = epochs_done
    return out


def make_optimizer(ac, cfg):
    groups = [{"params": ac.policy_parameters(), "lr": cfg.ppo.learning_rate}]
    if ac.with_critic:
        groups.append({"params": ac.value_parameters(), "lr": cfg.ppo.value_learning_rate})
    return torch.optim.AdamW(groups, weight_decay=0.0)


@torch.no_grad()
def evaluate_prompts(ac, engine, tok, prompts, reward_fn, cfg, seed: int) -> dict:
    """Held-out prompts, one sample each with a fixed seed: reward and KL per answer."""
    from reward.api import call_reward

    from .experience import collate

    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    sampling = SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, seed=seed)
    comps = engine.generate(ids, sampling)
    scores = torch.tensor(call_reward(reward_fn, [m[-1]["content"] for m in prompts],
                                      [c.text for c in comps], truncated=[not c.finished for c in comps]))
    x, attn, pred_pos, targets, mask = collate(comps, tok.pad_token_id, ac.device)
    ac.eval()
    with ac.role("policy"):
        logp, _ = ac.token_logprobs(x, attn, pred_pos, targets)
    with ac.role("reference"):
        ref, _ = ac.token_logprobs(x, attn, pred_pos, targets)
    ac.train()
    kl = ((logp - ref) * mask).sum(1)
    return {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
            "kl_per_answer": float(kl.mean()), "length": float(mask.sum(1).mean()),
            "samples": [{"prompt": m[-1]["content"], "completion": c.text, "reward": float(s)}
                        for m, c, s in zip(prompts[:4], comps[:4], scores[:4])]}


def train_ppo(ac, engine, tok, train_prompts, eval_prompts, cfg, run, log=print) -> dict:
    """The loop. Everything it needs to continue exactly after a crash goes into each
    checkpoint (:func:`save_checkpoint`); ``run.resume_from`` brings it back."""
    reward_fn = load_reward_fn(cfg.reward.function)
    p = cfg.ppo
    optimizer = make_optimizer(ac, cfg)
    kl_ctl = losses.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target > 0 else None
    sampling = SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p)
    world, rank = distributed.world_size(), distributed.rank()
    if rank != 0:  # the ranks agree on every number; one of them reports
        def log(*args, **kwargs):
            return None
    data = PromptOrder(len(train_prompts), cfg.run.seed)
    guard, stop = NonFiniteGuard(cfg.run.max_nonfinite_steps), GracefulStop()
    eval_seed = cfg.run.seed + 12345
    samples_path = run.path / "samples.jsonl"

    def run_eval(it):
        if not eval_prompts:
            return None
        ev = evaluate_prompts(ac, engine, tok, [p["messages"] for p in eval_prompts], reward_fn, cfg,
                              eval_seed)
        with open(samples_path if rank == 0 else os.devnull, "a") as f:
            for s in ev.pop("samples"):
                f.write(json.dumps({"iteration": it, "split": "eval", **s}) + "\n")
        run.log({"step": it, **{f"eval/{k}": v for k, v in ev.items()}})
        log(f"[eval it {it}] reward {ev['reward_mean']:.3f} ± {ev['reward_std']:.3f}, "
            f"KL/answer {ev['kl_per_answer']:.2f}")
        return ev

    if run.resume_from is not None:
        state = load_checkpoint(ac, optimizer, kl_ctl, data, run.resume_from)
        first, history, elapsed = state["iteration"] + 1, state["history"], state["elapsed"]
        guard.skipped = state["nonfinite_skipped"]
        engine.sync(ac.model, state["iteration"])  # the engine must serve the resumed policy
        log(f"resumed at iteration {first} from {run.resume_from}")
    else:
        initial = run_eval(0)
        first, history, elapsed = 1, [initial] if initial else [], 0.0
    t_start = time.time() - elapsed
    it, last_saved = first - 1, None

    def checkpoint(it, ev):
        state = {"iteration": it, "history": history, "elapsed": time.time() - t_start,
                 "nonfinite_skipped": guard.skipped}
        return save_checkpoint(ac, run, it, cfg, ev, optimizer, kl_ctl, data, state)

    with stop:
        for it in range(first, p.iterations + 1):
            t0 = time.time()
            share = p.prompts_per_iteration // world  # every rank draws the global batch, keeps its part
            picked = data.take(p.prompts_per_iteration)[rank * share:(rank + 1) * share]
            batch = [train_prompts[i]["messages"] for i in picked]
            beta = kl_ctl.beta if kl_ctl else p.kl_coef
            gen_before = engine.stats.seconds
            k = p.samples_per_prompt  # one seed per sample, from its place in the *global* batch
            seeds = [((cfg.run.seed * 1_000_003 + it) * 100_003 + (rank * share + j)) * 101 + s
                     for j in range(len(batch)) for s in range(k)]
            exp = make_experience(ac, engine, tok, batch, reward_fn, cfg, beta,
                                  dataclasses.replace(sampling, row_seeds=seeds))
            t_gen = engine.stats.seconds - gen_before
            if torch.isfinite(exp.advantages).all() and (exp.returns is None or torch.isfinite(exp.returns).all()):
                upd = ppo_update(ac, exp, optimizer, cfg, guard, it)
            else:  # e.g. a critic that diverged: no update from this batch
                guard.skip(ac.policy_parameters() + ac.value_parameters(), f"iteration {it} (advantages)")
                upd = {}
            t_sync = time.time()
            engine.sync(ac.model, it)
            t_sync = time.time() - t_sync
            parity = guard_parity(engine, ac, tok, eval_prompts or train_prompts, cfg, it)
            # statistics of the global batch (every rank's samples)
            scores = torch.tensor(sum(distributed.gather_objects(exp.scores.tolist()), []))
            kls = sum(distributed.gather_objects(exp.kl.sum(1).tolist()), [])
            finished = sum(distributed.gather_objects(list(exp.finished)), [])
            kl_answer = sum(kls) / len(kls)
            if kl_ctl:
                kl_ctl.update(kl_answer, len(kls))
            n_tok = int(distributed.all_sum(exp.mask.sum()))
            dt = time.time() - t0
            rec = {"step": it, "reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
                   "kl_per_answer": kl_answer, "kl_coef": beta, **upd,
                   "truncated_frac": 1 - sum(finished) / len(finished), "gen_tokens": n_tok,
                   "gen_tokens_per_s": n_tok / max(t_gen, 1e-9), "iteration_seconds": dt,
                   "sync_seconds": t_sync, "engine_logprob_gap": exp.engine_logprob_gap,
                   "nonfinite_skipped": guard.skipped, **parity}
            run.log(rec)
            with open(samples_path if rank == 0 else os.devnull, "a") as f:
                for i in range(min(2, len(exp))):
                    f.write(json.dumps({"iteration": it, "split": "train", "prompt": exp.prompts[i],
                                        "completion": exp.completions[i], "reward": float(exp.scores[i])}) + "\n")
            log(f"[it {it}/{p.iterations}] reward {rec['reward_mean']:.3f} KL/answer {kl_answer:.2f} "
                f"clip {upd.get('clipfrac', float('nan')):.2f} approx-KL {upd.get('approx_kl', float('nan')):.3f} "
                f"{dt:.0f}s")
            out_of_time = distributed.any_rank(  # rank 0's clock decides for all
                rank == 0 and p.time_budget_minutes and time.time() - t_start > 60 * p.time_budget_minutes)
            ev = None
            if p.eval_every and (it % p.eval_every == 0 or it == p.iterations or out_of_time):
                ev = run_eval(it)
                history.append(ev)
            if cfg.run.save_every and it % cfg.run.save_every == 0:
                last_saved = checkpoint(it, ev)
            if stop.requested_anywhere():
                if last_saved is None or last_saved.name != f"step-{it}":
                    last_saved = checkpoint(it, ev)
                raise Interrupted(stop.signum, last_saved)
            if out_of_time:
                log(f"time budget of {p.time_budget_minutes} min reached after iteration {it}")
                break
    out = {"iterations": it, "train_seconds": round(time.time() - t_start, 1),
           "nonfinite_steps_skipped": guard.skipped, "resumed_from": str(run.resume_from or "")}
    if history and history[0] and history[-1]:
        init, last = history[0], history[-1]
        out.update(eval_initial=init, eval_final=last,
                   reward_gain_in_initial_std=(last["reward_mean"] - init["reward_mean"])
                   / max(init["reward_std"], 1e-9))
    return out


class PromptOrder:
    """Seeded shuffled passes over the training prompts; its position is part of a checkpoint."""

    def __init__(self, n: int, seed: int):
        self.n, self.gen = n, torch.Generator().manual_seed(seed)
        self.order, self.cursor = torch.randperm(n, generator=self.gen).tolist(), 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.cursor == self.n:
                self.order, self.cursor = torch.randperm(self.n, generator=self.gen).tolist(), 0
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"order": self.order, "cursor": self.cursor, "gen": self.gen.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.order, self.cursor = d["order"], d["cursor"]
        self.gen.set_state(d["gen"])


def guard_parity(engine, ac, tok, prompts, cfg, it: int) -> dict:
    """After a sync, the engine must decode exactly like the trainer's current policy."""
    n, every = cfg.rollout.parity_prompts, cfg.rollout.parity_every
    if engine.name == "hf" or not n or not every or it % every:
        return {}
    from ..rollout.vllm_engine import StaleAdapterError, check_parity

    texts = [p["messages"][-1]["content"] for p in prompts[:n]]
    with ac.role("policy"):
        res = check_parity(engine, ac.model, tok, texts)
    if res["mismatches"]:
        raise StaleAdapterError(
            f"iteration {it}: the {engine.name} engine does not decode like the trainer's policy "
            f"(adapter version {engine.version}); first mismatch: {res['mismatches'][0]}")
    return {"parity_checked": res["prompts"]}


def _rng_state() -> dict:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(d: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(d["torch"])
    random.setstate(d["python"])
    np.random.set_state(d["numpy"])
    if d.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])


def save_checkpoint(ac, run, it: int, cfg, ev: dict | None = None, optimizer=None, kl_ctl=None,
                    data: PromptOrder | None = None, state: dict | None = None):
    """Iteration ``it``, atomically (temp folder + rename): ``adapter/`` (PEFT, exportable),
    ``critic/`` + ``value_head.pt``, ``eval.json`` when the held-out eval ran at this iteration
    (``align export --checkpoint best`` ranks by it), and ``trainer_state.pt`` -- trainable
    weights, optimizer, KL controller, prompt order, RNG states, counters -- to resume exactly."""
    from ..dpo import save_adapter

    rank = distributed.rank()
    tmp = stage_dir(run.path, it) if rank == 0 else run.path / "checkpoints" / f".tmp-step-{it}"
    distributed.barrier()
    torch.save(_rng_state(), tmp / f"rng_state_{rank}.pt")  # each rank's own stream
    if rank != 0:
        distributed.barrier()
        distributed.barrier()
        return run.path / "checkpoints" / f"step-{it}"
    save_adapter(ac.model, tmp / "adapter", cfg.model.name)
    if ev is not None:
        (tmp / "eval.json").write_text(json.dumps(ev, indent=2))
    if ac.with_critic:
        ac.model.save_pretrained(tmp / "critic", selected_adapters=["value"])
        torch.save(ac.critic_state(), tmp / "value_head.pt")
    if optimizer is not None:
        torch.save({"trainable": ac.trained_state(), "optimizer": optimizer.state_dict(),
                    "kl_ctl": kl_ctl.state_dict() if kl_ctl else None,
                    "data": data.state_dict() if data else None, **(state or {})},
                   tmp / "trainer_state.pt")
    distributed.barrier()  # every rank's RNG file is written
    final = publish(tmp, run.path, it, cfg.run.keep_last)
    distributed.barrier()
    return final


def load_checkpoint(ac, optimizer, kl_ctl, data: PromptOrder, path) -> dict:
    """Put a :func:`save_checkpoint` state back; returns its counters and history."""
    f = path / "trainer_state.pt"
    if not f.is_file():
        raise ValueError(f"checkpoint '{path}' has no trainer_state.pt (written by an older align?); "
                         "it cannot be resumed")
    state = torch.load(f, weights_only=False)
    ac.load_trained_state(state["trainable"], f"checkpoint '{path}'")
    optimizer.load_state_dict(state["optimizer"])
    if kl_ctl is not None and state["kl_ctl"]:
        kl_ctl.beta = state["kl_ctl"]["beta"]
    data.load_state_dict(state["data"])
    rng = path / f"rng_state_{distributed.rank()}.pt"
    if not rng.is_file():
        raise ValueError(f"checkpoint '{path}' has no {rng.name}: it was written by a run with fewer "
                         "processes; resume with the same number of processes")
    _set_rng_state(torch.load(rng, weights_only=False))
    return state
