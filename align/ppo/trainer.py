"""The PPO loop, top to bottom: sample prompts -> make experience -> update -> sync the engine
(+ parity guard) -> log; held-out evaluation, checkpoints, signals and the time budget around it.

:func:`train_ppo` is the algorithm box; :class:`PPOLoop` holds what the loop carries from one
iteration to the next (optimizer, KL controller, prompt order, counters) -- exactly what a
checkpoint must hold to continue after a crash as if nothing happened.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import torch

from reward.api import RewardCancelled

from .. import checkpoints, distributed, verifiable
from ..compute import ComputeMeter
from ..adapters import save_adapter
from ..memory import release_freed_memory
from ..guards import GracefulStop, Interrupted, NonFiniteGuard, check_divergence
from ..rollout.base import SamplingConfig
from ..rollout.parity import TIE_MARGIN, guard_parity
from .advantages import get_estimator
from .heldout import evaluate_prompts, side_by_side
from .experience import make_experience
from .kl import make_kl_controller
from ..scorers import make_reward
from .update import LossPasses, make_optimizer, ppo_update


def train_ppo(ac, engine, tok, train_prompts, eval_prompts, cfg, run, log=print) -> dict:
    """Run ``ppo.iterations`` iterations (or until the time budget); returns the summary."""
    p = cfg.ppo
    loop = PPOLoop(ac, engine, tok, train_prompts, eval_prompts, cfg, run,
                   log if distributed.rank() == 0 else _quiet)  # the ranks agree; one reports
    first = loop.resume() if run.resume_from is not None else loop.start()
    it = first - 1
    with loop.stop:
        for it in range(first, p.iterations + 1):
            t0 = time.time()
            exp, gen_seconds = loop.experience(it)       # sample -> reward -> log-probs -> advantages
            upd = loop.update(exp, it)                   # PPO epochs on this batch
            sync_seconds, parity = loop.sync(it)         # the engine serves the new policy, checked
            loop.record(it, exp, upd, gen_seconds, sync_seconds, time.time() - t0, parity)
            out_of_time = loop.out_of_time()
            ev = None
            # the last iteration is always evaluated (eval_every=0 only drops the periodic ones):
            # without it the summary would compare the initial evaluation with itself
            if (p.eval_every and it % p.eval_every == 0) or it == p.iterations or out_of_time:
                ev = loop.evaluate(it, final=it == p.iterations or out_of_time)
            if cfg.run.save_every and it % cfg.run.save_every == 0:
                loop.checkpoint(it, ev)
            loop.stop_if_asked(it, ev)
            if out_of_time:
                loop.log(f"time budget of {p.time_budget_minutes} min reached after iteration {it}")
                break
    return loop.summary(it)


def _quiet(*args, **kwargs):
    return None


class PPOLoop:
    def __init__(self, ac, engine, tok, train_prompts, eval_prompts, cfg, run, log):
        self.ac, self.engine, self.tok, self.cfg, self.run, self.log = ac, engine, tok, cfg, run, log
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.reward_fn = make_reward(cfg.reward, ac, tok, "reward", cfg.model.name)
        self.judge_fn = make_reward(cfg.judge, ac, tok, "judge", cfg.model.name) if cfg.judge.kind != "none" else None
        self.estimator = get_estimator(cfg.ppo)
        # DDP or FSDP2 over the trained adapters; before the optimizer: FSDP2 replaces the weights
        self.passes = distributed.data_parallel(LossPasses(ac), distributed.parallelism(cfg.ppo.parallelism))
        self.optimizer = make_optimizer(ac, cfg)
        self.kl = make_kl_controller(cfg.ppo)
        self.order = PromptOrder(len(train_prompts), cfg.run.seed)
        self.guard, self.stop = NonFiniteGuard(cfg.run.max_nonfinite_steps), GracefulStop()
        self.history: list = []
        self.meter = ComputeMeter(ac.model)
        self._phases_before: dict = {}
        self.t_start, self.last_saved = time.time(), None
        self.samples_path = run.path / "samples.jsonl" if distributed.rank() == 0 else os.devnull

    def progress(self, text: str) -> None:
        """Where an iteration is, as it goes (an iteration can take minutes)."""
        self.log(text, end="", flush=True)

    # -- start / resume ----------------------------------------------------------------
    def start(self) -> int:
        if self.cfg.ppo.eval_at_start:
            self.evaluate(0)  # the initial held-out numbers every later evaluation is compared with
        return 1

    def resume(self) -> int:
        state = load_checkpoint(self, self.run.resume_from)
        self.history, self.guard.skipped = state["history"], state["nonfinite_skipped"]
        self.t_start = time.time() - state["elapsed"]
        self.engine.sync(self.ac.model, state["iteration"])  # the engine must serve the resumed policy
        self.log(f"resumed at iteration {state['iteration'] + 1} from {self.run.resume_from}")
        return state["iteration"] + 1

    # -- one iteration -----------------------------------------------------------------
    def experience(self, it: int):
        """This rank's share of the global batch of prompts, each sampled k times with a seed
        from its place in the *global* batch (so N processes sample what one would)."""
        p, world, rank = self.cfg.ppo, distributed.world_size(), distributed.rank()
        share = p.prompts_per_iteration // world
        picked = self.order.take(p.prompts_per_iteration)[rank * share:(rank + 1) * share]
        batch = [self.train_prompts[i] for i in picked]
        k = p.samples_per_prompt
        seeds = [((self.cfg.run.seed * 1_000_003 + it) * 100_003 + (rank * share + j)) * 101 + s
                 for j in range(len(batch)) for s in range(k)]
        r = self.cfg.rollout
        sampling = SamplingConfig(r.max_new_tokens, r.temperature, r.top_p, row_seeds=seeds,
                                  logprobs=p.old_logprobs == "engine")
        self._phases_before = {k: v[0] for k, v in self.meter.phases.items()}
        gen_before = self.engine.stats.seconds
        self.progress(f"[it {it}/{p.iterations}] {len(batch) * k * world} answers: generate, reward, score ...")
        with self._reward_interruptible():
            exp = make_experience(self.ac, self.engine, self.tok, batch, self.reward_fn, self.cfg,
                                  self.estimator, self.kl.beta, sampling, cancelled=self._cancelled,
                                  meter=self.meter)
        release_freed_memory()  # the scoring passes' leftovers, before the update's activations
        return exp, self.engine.stats.seconds - gen_before

    def _cancelled(self) -> bool:
        return self.stop.requested

    @contextlib.contextmanager
    def _reward_interruptible(self):
        """A signal while the reward function runs stops the wait at once: the iteration is
        abandoned and the last checkpoint is the place to resume from (a second signal exits)."""
        try:
            yield
        except RewardCancelled:
            raise Interrupted(self.stop.signum, checkpoints.latest_checkpoint(self.run.path)) from None

    def update(self, exp, it: int) -> dict:
        if float(distributed.all_sum(exp.train_mask.sum())) == 0:  # the same decision on every rank
            self.progress(" no update (no sample to learn from: every group's rewards were equal or unscored)")
            return {}
        self.progress(" update ...")
        if torch.isfinite(exp.advantages).all() and (exp.returns is None or torch.isfinite(exp.returns).all()):
            out = ppo_update(self.ac, exp, self.optimizer, self.cfg, self.guard, it, meter=self.meter,
                             kl_coef=self.kl.beta, passes=self.passes)
            check_divergence(self.ac.model, f"iteration {it}")
            release_freed_memory()  # the update's activations, before the next generation
            return out
        # e.g. a critic that diverged: no update from this batch
        self.guard.skip(self.ac.policy_parameters() + self.ac.value_parameters(), f"iteration {it} (advantages)")
        return {}

    def sync(self, it: int) -> tuple[float, dict]:
        self.progress(f" sync {self.engine.name} ...\n")
        t = time.time()
        self.engine.sync(self.ac.model, it)
        seconds = time.time() - t
        self.meter.add("sync", seconds, 0.0)
        r = self.cfg.rollout
        texts = [q["messages"][-1]["content"] for q in self.eval_prompts or self.train_prompts]
        with self.ac.role("policy"):
            parity = guard_parity(self.engine, self.ac.model, self.tok, texts, r.parity_prompts, r.parity_every, it,
                                  tie_margin=TIE_MARGIN[self.engine.dtype_name or self.cfg.model.dtype])
        return seconds, parity

    def record(self, it, exp, upd, gen_seconds, sync_seconds, seconds, parity) -> dict:
        """Log the global batch's statistics (every rank's samples) and move the KL controller."""
        scores = torch.tensor(sum(distributed.gather_objects(exp.all_scores.tolist()), []), device="cpu")  # host stats
        scored = scores[torch.isfinite(scores)]
        kls = sum(distributed.gather_objects(exp.kl.sum(1).tolist()), [])
        finished = sum(distributed.gather_objects(list(exp.finished)), [])
        kl_answer = sum(kls) / len(kls)
        beta = self.kl.beta
        self.kl.update(kl_answer, len(kls))
        n_tok = int(distributed.all_sum(exp.mask.sum()))
        rec = {"step": it, "reward_mean": float(scored.mean()), "reward_std": float(scored.std()),
               "unscored": int(len(scores) - len(scored)),
               "groups_skipped": int(distributed.all_sum(torch.tensor(exp.groups_skipped, device=distributed.device()))),
               "kl_per_answer": kl_answer, "kl_coef": beta, **upd,
               "truncated_frac": 1 - sum(finished) / len(finished), "gen_tokens": n_tok,
               "gen_tokens_per_s": n_tok / max(gen_seconds, 1e-9), "iteration_seconds": seconds,
               "sync_seconds": sync_seconds, "engine_logprob_gap": exp.engine_logprob_gap,
               "nonfinite_skipped": self.guard.skipped, **parity,
               **{f"seconds_{k}": round(v[0] - self._phases_before.get(k, 0.0), 3)
                  for k, v in self.meter.phases.items()}}
        self.run.log(rec)
        with open(self.samples_path, "a") as f:
            for i in range(min(2, len(exp))):
                f.write(json.dumps({"iteration": it, "split": "train", "prompt": exp.prompts[i],
                                    "completion": exp.completions[i], "reward": float(exp.scores[i])}) + "\n")
        self.log(f"[it {it}/{self.cfg.ppo.iterations}] reward {rec['reward_mean']:.3f} KL/answer {kl_answer:.2f} "
                 f"clip {upd.get('clipfrac', float('nan')):.2f} approx-KL {upd.get('approx_kl', float('nan')):.3f} "
                 f"{seconds:.0f}s")
        return rec

    # -- around the iterations -------------------------------------------------------------
    def evaluate(self, it: int, final: bool = False) -> dict | None:
        """Reward and KL on the held-out prompts (a fixed sampling seed, so runs compare), and
        accuracy where they carry reference answers -- pass@k only at the first and the final
        evaluation (it costs k-1 more answers per prompt)."""
        if not self.eval_prompts:
            return None
        with self._reward_interruptible(), self.meter.time("evaluate"):
            ev = evaluate_prompts(self.ac, self.engine, self.tok, self.eval_prompts, self.reward_fn, self.cfg,
                                  self.cfg.run.seed + 12345, cancelled=self._cancelled, judge_fn=self.judge_fn) \
                if self.cfg.ppo.eval_sampled else {"completions": None, "answers": []}
            acc, greedy = self.accuracy(ev.pop("completions"), pass_k=it == 0 or final)
        release_freed_memory()
        with open(self.samples_path, "a") as f:
            for s in ev.pop("answers"):
                f.write(json.dumps({"iteration": it, "split": "eval", **s}) + "\n")
            for s in greedy:
                f.write(json.dumps({"iteration": it, "split": "eval_greedy", **s}) + "\n")
        evaluated = self.meter.phases.get("evaluate", (0.0,))[0]
        ev.update(iteration=it, train_seconds=round(time.time() - self.t_start - evaluated, 1),
                  **verifiable.flat(acc), **({"accuracy": acc} if acc else {}))
        self.run.log({"step": it, **{f"eval/{k}": v for k, v in ev.items() if k != "accuracy"}})
        sampled = f"reward {ev['reward_mean']:.3f} ± {ev['reward_std']:.3f}, KL/answer {ev['kl_per_answer']:.2f}" \
            if "reward_mean" in ev else ""
        graded = f"greedy accuracy strict {acc['greedy']['strict']:.3f} lenient {acc['greedy']['lenient']:.3f}" if acc else ""
        self.log(f"[eval it {it}] " + ", ".join(x for x in (sampled, graded) if x))
        self.history.append(ev)
        return ev

    def accuracy(self, sampled, pass_k: bool):
        """Held-out accuracy when the held-out prompts carry reference answers (:mod:`align.verifiable`);
        ``sampled`` (one answer per prompt, just drawn for the reward/KL numbers) is the first of
        pass@k's k answers."""
        d, r = self.cfg.data, self.cfg.rollout
        return verifiable.accuracy(self.engine, self.eval_prompts, d.answer_field, d.difficulty_field,
                                   r.max_new_tokens, self.cfg.ppo.eval_pass_k if pass_k else 0, r.temperature,
                                   r.top_p, self.cfg.run.seed + 54321, first_samples=sampled)

    def out_of_time(self) -> bool:
        budget = self.cfg.ppo.time_budget_minutes
        return distributed.any_rank(  # rank 0's clock decides for all
            distributed.rank() == 0 and bool(budget) and time.time() - self.t_start > 60 * budget)

    def checkpoint(self, it: int, ev: dict | None):
        state = {"iteration": it, "history": self.history, "elapsed": time.time() - self.t_start,
                 "nonfinite_skipped": self.guard.skipped}
        self.last_saved = save_checkpoint(self, it, ev, state)

    def stop_if_asked(self, it: int, ev: dict | None) -> None:
        """After a signal on any rank: save this iteration (unless just saved) and stop."""
        if self.stop.requested_anywhere():
            if self.last_saved is None or self.last_saved.name != f"step-{it}":
                self.checkpoint(it, ev)
            raise Interrupted(self.stop.signum, self.last_saved)

    def summary(self, it: int) -> dict:
        out = {"iterations": it, "train_seconds": round(time.time() - self.t_start, 1),
               "nonfinite_steps_skipped": self.guard.skipped, "resumed_from": str(self.run.resume_from or ""),
               "compute": self.meter.report()}
        if self.history and self.history[-1]:
            init, last = self.history[0], self.history[-1]
            out["eval_final"] = last
            if init["iteration"] == 0:  # not when ppo.eval_at_start=false
                out["eval_initial"] = init
            if "reward_mean" in last and "eval_initial" in out:
                out["reward_gain_in_initial_std"] = (last["reward_mean"] - init["reward_mean"]) / max(init["reward_std"], 1e-9)
            if "accuracy_lenient" in last:  # recorded, never used to pick the reported (final) numbers
                best = max(self.history, key=lambda e: e.get("accuracy_lenient", -1))
                out["best_heldout"] = {"iteration": best["iteration"], "accuracy_lenient": best["accuracy_lenient"],
                                       "accuracy_strict": best["accuracy_strict"],
                                       "note": "chosen on the held-out set: not an unbiased estimate"}
            if distributed.rank() == 0:
                pairs = side_by_side(self.samples_path, self.run.path / "heldout_side_by_side.jsonl")
                if pairs is not None:
                    out["side_by_side"] = pairs
                change = verifiable.accuracy_change(self.samples_path) if "accuracy_lenient" in last else None
                if change is not None:
                    out["accuracy_change"] = change
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


def save_checkpoint(loop: PPOLoop, it: int, ev: dict | None, state: dict):
    """Iteration ``it`` in the common checkpoint layout (:func:`align.checkpoints.save_checkpoint`):
    ``adapter/`` (PEFT, exportable), ``critic/`` + ``value_head.pt``, ``eval.json`` when the
    held-out eval ran at this iteration (``align export --checkpoint best`` ranks by it), and
    ``trainer_state.pt`` -- trainable weights, optimizer, KL controller, prompt order, counters."""
    ac, cfg = loop.ac, loop.cfg
    # gathered on every rank (FSDP2 shards: only the adapters, head and optimizer moments move);
    # rank 0 writes
    policy, trainable = ac.adapter_state(), ac.trained_state()
    separate_critic = ac.with_critic and not ac.shared_critic
    critic, head = (ac.adapter_state("value"), ac.critic_state()) if separate_critic else (None, None)
    optimizer = distributed.optimizer_state(ac, loop.optimizer)

    def write(folder):
        ac.save_policy(folder, cfg.model.name, loop.tok, state=policy)
        if ev is not None:
            (folder / "eval.json").write_text(json.dumps(ev, indent=2))
        if separate_critic:
            save_adapter(ac.model, folder / "critic", cfg.model.name, adapter_name="value", state_dict=critic)
            torch.save(head, folder / "value_head.pt")
        torch.save({"trainable": trainable, "optimizer": optimizer,
                    "kl_ctl": loop.kl.state_dict(), "data": loop.order.state_dict(), **state},
                   folder / "trainer_state.pt")

    return checkpoints.save_checkpoint(loop.run.path, it, cfg.run.keep_last, write)


def load_checkpoint(loop: PPOLoop, path) -> dict:
    """Put a :func:`save_checkpoint` state back into ``loop``; returns its counters and history."""
    f = path / "trainer_state.pt"
    if not f.is_file():
        raise ValueError(f"checkpoint '{path}' has no trainer_state.pt (written by an older align?); "
                         "it cannot be resumed")
    state = torch.load(f, weights_only=False, map_location=loop.ac.device)  # saved on any device
    loop.ac.load_trained_state(state["trainable"], f"checkpoint '{path}'")
    distributed.load_optimizer_state(loop.ac, loop.optimizer, state["optimizer"], f"checkpoint '{path}'")
    if state["kl_ctl"]:
        loop.kl.load_state_dict(state["kl_ctl"])
    loop.order.load_state_dict(state["data"])
    checkpoints.restore_rng(path)
    return state
