"""Experience making, apart from the update: rollouts -> rewards -> log-probs of policy and
reference, values, per-token KL penalty, advantages and returns."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import distributed
from ..compute import NullMeter, forward_gflop
from ..memory import release_freed_memory
from ..rollout.base import Completion, SamplingConfig
from ..scorers import score_completions
from ..scoring.batch import TokenBatch, in_chunks, make_batch, rows_batch
from . import losses


@dataclass
class Experience:
    batch: TokenBatch             # what the model reads; batch.mask (B, T) marks real answer tokens
    old_logp: torch.Tensor        # (B, T) policy at sampling time
    ref_logp: torch.Tensor        # (B, T) reference (adapters off)
    values: torch.Tensor | None   # (B, T) critic
    scores: torch.Tensor          # (B,) reward function (+ truncation penalty)
    kl: torch.Tensor              # (B, T) per-token KL estimate, masked
    advantages: torch.Tensor      # (B, T)
    returns: torch.Tensor | None  # (B, T)
    prompts: list[str]
    completions: list[str]
    finished: list[bool]
    group_size: int = 1           # samples [g*k, (g+1)*k) answer the same prompt
    # mean |engine log-prob - trainer log-prob| of the sampled tokens (None: engine gave none)
    engine_logprob_gap: float | None = None
    loss_mask: torch.Tensor | None = None  # (B, T) the tokens the loss learns from (None: mask)
    all_scores: torch.Tensor | None = None  # every sample's score, skipped groups too (logging)
    groups_skipped: int = 0                 # groups left out: their rewards were all equal

    def __post_init__(self):
        if self.all_scores is None:
            self.all_scores = self.scores

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.mask

    @property
    def train_mask(self) -> torch.Tensor:
        """The tokens the update's losses are taken over."""
        return self.mask if self.loss_mask is None else self.loss_mask

    def __len__(self) -> int:
        return len(self.batch)

    def select(self, idx: torch.Tensor) -> "Experience":
        out = {}
        for k, v in self.__dict__.items():
            if k == "all_scores":
                out[k] = v
            elif isinstance(v, (torch.Tensor, TokenBatch)):
                out[k] = v.select(idx) if isinstance(v, TokenBatch) else v[idx]
            elif isinstance(v, list):
                out[k] = [v[i] for i in idx.tolist()]
            else:
                out[k] = v
        return Experience(**out)

    def minibatches(self, size: int) -> list[torch.Tensor]:
        """Sample indices of shuffled minibatches that keep each prompt's answers together
        (a packed row is read once per minibatch, not once per sample)."""
        k = self.group_size if len(self) % self.group_size == 0 else 1
        perm = torch.randperm(len(self) // k)
        order = (perm[:, None] * k + torch.arange(k)).reshape(-1)
        return [order[s:s + size] for s in range(0, len(order), size)]


def collate(completions: list[Completion], pad_id: int, device=None) -> TokenBatch:
    """One right-padded row (prompt + answer) per completion."""
    return rows_batch(completions, pad_id, device)


@torch.no_grad()
def make_experience(ac, engine, tok, prompts: list[dict], reward_fn, cfg, estimator, kl_coef: float,
                    sampling: SamplingConfig, cancelled=None, meter=None) -> Experience:
    """``prompts`` carry ``messages`` and their token ``ids`` (:func:`align.chat.encode_prompts`);
    each is sampled ``cfg.ppo.samples_per_prompt`` times. ``estimator``
    (:mod:`align.ppo.advantages`) turns scores, KL and values into advantages."""
    k = cfg.ppo.samples_per_prompt
    meter = meter or NullMeter()
    t = time.perf_counter()
    completions = engine.generate([p["ids"] for p in prompts for _ in range(k)], sampling)
    release_freed_memory()  # generation's KV cache and logits, before the scoring passes
    generated = sum(len(c.token_ids) for c in completions)
    meter.add("generate", time.perf_counter() - t,  # each sample's prompt, then its tokens one by one
              forward_gflop(meter.counts, sum(len(c.prompt_ids) for c in completions) + generated, generated))
    samples = [p for p in prompts for _ in range(k)]
    prompt_text = [p["messages"][-1]["content"] for p in samples]
    comp_text = [c.text for c in completions]
    finished = [c.finished for c in completions]
    with meter.time("reward"):
        scores = score_completions(reward_fn, samples, completions, cfg.reward, ac.device, cancelled)
    all_scores, skipped = scores, 0
    if cfg.ppo.skip_equal_reward_groups and k > 1:
        equal = losses.equal_reward_groups(scores, k)
        skipped = int(equal.sum())
        if skipped < len(equal):  # all equal: kept whole below, with no weight in the loss
            keep = (~equal).repeat_interleave(k).nonzero().squeeze(1).tolist()
            completions, samples = [completions[i] for i in keep], [samples[i] for i in keep]
            prompt_text, comp_text = [prompt_text[i] for i in keep], [comp_text[i] for i in keep]
            finished, scores = [finished[i] for i in keep], scores[keep]

    lm = ac.lm()
    tb = make_batch(completions, k, tok.pad_token_id, lm.config, ac.device, pack=cfg.ppo.pack)
    mask = tb.mask
    was_training = ac.training
    ac.eval()
    engine_logp = _engine_logprobs(completions, mask)
    from_engine = cfg.ppo.old_logprobs == "engine" and engine_logp is not None and not estimator.needs_critic
    scored = int(mask.sum())
    chunk = cfg.ppo.micro_batch_size  # scoring's peak memory bounded like the update's
    if from_engine:
        old_logp, values = engine_logp, None  # exact up to float rounding: no policy pass needed
    else:
        passes = 2 if ac.with_critic and not ac.shared_critic else 1  # policy (+ a separate critic's)
        with meter.time("score", tb.tokens * passes, scored):
            old_logp, _, values = in_chunks(ac.policy_pass, tb, chunk, k)
        values = values * mask if values is not None else None
    with meter.time("score", tb.tokens, scored), ac.role("reference"):
        ref_logp, _ = in_chunks(ac.token_logprobs, tb, chunk, k)
    ac.train(was_training)
    old_logp, ref_logp = old_logp * mask, ref_logp * mask
    kl, advantages, returns = advantages_of(estimator, scores, old_logp, ref_logp, mask, values, kl_coef, cfg.ppo)
    weight = loss_weights(scores, finished, cfg.ppo, skipped == len(all_scores) // k)
    return Experience(tb, old_logp, ref_logp, values, scores, kl, advantages, returns, prompt_text, comp_text,
                      finished, k, None if from_engine else engine_logprob_gap(completions, old_logp, mask),
                      loss_mask=None if weight is None else mask * weight[:, None].to(mask.dtype),
                      all_scores=all_scores, groups_skipped=skipped)


def loss_weights(scores: torch.Tensor, finished: list[bool], p, none_kept: bool) -> torch.Tensor | None:
    """(B,) 0/1: which samples the loss learns from (None: all). Out: samples the reward did not
    score (NaN), truncated ones with ``ppo.mask_truncated_completions``, everything when every
    group was skipped as equal."""
    keep = torch.isfinite(scores)
    if p.mask_truncated_completions:
        keep &= torch.tensor(finished, device=scores.device)
    if none_kept:
        keep &= False
    return None if bool(keep.all()) else keep


def advantages_of(estimator, scores, old_logp, ref_logp, mask, values, kl_coef: float, p):
    """Per-token KL, advantages and returns of a scored batch. With ``ppo.kl_penalty=loss`` the
    KL is the update's loss term, not part of the score, and the KL kept (logged; the adaptive
    controller's input) is the plain log-ratio k1."""
    in_reward = p.kl_penalty == "reward"
    kl = losses.kl_per_token(old_logp, ref_logp, p.kl_estimator if in_reward else "k1") * mask
    advantages, returns = estimator.compute(scores, kl, mask, values, kl_coef if in_reward else 0.0, p)
    if p.whiten_advantages:
        advantages = estimator.normalize(advantages, mask, all_sum=distributed.all_sum)
    return kl, advantages, returns


def _engine_logprobs(completions: list[Completion], mask: torch.Tensor) -> torch.Tensor | None:
    """The engine's log-probs of the sampled tokens as a (B, T) tensor (None: it gave none)."""
    if not completions or any(c.logprobs is None for c in completions):
        return None
    eng = torch.zeros(mask.shape, device=mask.device)
    for i, c in enumerate(completions):
        eng[i, :len(c.logprobs)] = torch.tensor(c.logprobs, device=mask.device)
    return eng * mask


def engine_logprob_gap(completions: list[Completion], logp: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean |engine log-prob - trainer log-prob| over sampled tokens (None: no engine log-probs)."""
    eng = _engine_logprobs(completions, mask)
    if eng is None:
        return None
    return float(((eng - logp).abs() * mask).sum() / mask.sum().clamp(min=1))
