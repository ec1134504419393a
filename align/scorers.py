"""Reward kinds (``reward.kind``, ``judge.kind``): a user's Python function, or an adapter on the
shared base (:class:`align.roles.Roles`) -- an `align rm` reward model (``classifier``: LoRA +
score head, scored at the conversation's last token as in its training) or a DPO adapter
(``dpo``: the implicit reward beta * (log pi_dpo - log pi_ref) summed over the answer). PPO
rewards and judges its policy with these; `align eval` judges answers with them.

Adapter rewards are callables of the reward API's shape, ``(prompts, completions, **info) ->
list[float]``, so the loop calls every kind the same way (validated, bounded in time, handed the
whole conversation as token ids). They score what the policy was given: the prompt's tokens as
the engine saw them and the answer's tokens as generated.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from reward.api import call_reward, load_reward_fn

from .scoring.batch import rows_batch, score_by_length
from .chat import tokenize_pair
from .rollout.base import Completion


def make_reward(section, roles, tok, role: str, base_name: str):
    """The callable for a ``reward``/``judge`` config section (``role`` names its adapter); with
    ``reward.also``, the weighted sum of its terms (each an adapter role ``reward_1``...)."""
    also = getattr(section, "also", [])
    if not also:
        return _make_term(section, roles, tok, role, base_name)
    weights = list(getattr(section, "also_weights", [])) or [1.0] * len(also)
    terms = [(role, 1.0, _make_term(section, roles, tok, role, base_name))]
    for i, (spec, w) in enumerate(zip(also, weights), 1):
        terms.append((f"{role}_{i}", w, _make_term(section_of(spec), roles, tok, f"{role}_{i}", base_name,
                                                   key=f"{role}.also[{i - 1}]")))
    return SumReward(terms)


def _make_term(section, roles, tok, role: str, base_name: str, key: str = ""):
    """One term as the adapter role ``role``; ``key`` (default ``ROLE.adapter``) is named in errors."""
    if section.kind == "function":
        return load_reward_fn(section.function)
    key = key or f"{role}.adapter"
    found = find_adapter(section.adapter, key, base_name)
    path = found.path
    has_head = roles.add_scorer(role, path)
    if has_head != (section.kind == "classifier"):
        from .config import ConfigError

        kind_key = f"{role}.kind" if key == f"{role}.adapter" else "the kind"
        raise ConfigError(f"key '{key}': '{path}' is {'a reward model (score head)' if has_head else 'a causal-LM adapter (no score head)'}, "
                          f"so {kind_key} should be {'classifier' if has_head else 'dpo'}, not {section.kind}")
    beta = (section.beta or found.beta) if section.kind == "dpo" else 0.0
    return AdapterReward(roles, tok, role, section.kind, beta, path)


def section_of(spec: str):
    """A reward term written as one string (``align eval --judge``, ``reward.also``):
    ``classifier:PATH``, ``dpo:PATH``, ``function:SPEC``, or a bare path (a reward model)."""
    from .config import JudgeConfig

    kind, _, rest = spec.partition(":")
    if kind not in ("classifier", "dpo", "function"):
        kind, rest = "classifier", spec
    if kind == "function":
        return JudgeConfig(kind="function", function=rest)
    return JudgeConfig(kind=kind, adapter=rest)


def score_completions(reward_fn, prompts: list[dict], completions: list[Completion], reward_cfg,
                      device=None, cancelled=None, penalize: bool = True) -> torch.Tensor:
    """The reward function's scores (bounded by ``reward.timeout_seconds``; NaN where it gave
    ``None``), plus ``reward.truncation_penalty`` for answers cut without EOS when ``penalize``.
    ``prompts`` (one per completion) carry ``messages`` -- the function sees the whole dialogue
    -- and ``fields``, the data row's other fields, each passed as a keyword (one value per
    completion; a row without the field gives None)."""
    truncated = [not c.finished for c in completions]
    texts = [c.text for c in completions]
    asked = [p["messages"][-1]["content"] for p in prompts]
    if getattr(reward_cfg, "completions", "text") == "messages":  # TRL's conversational form
        texts = [[{"role": "assistant", "content": t}] for t in texts]
        asked = [p["messages"] for p in prompts]
    names = sorted({k for p in prompts for k in p.get("fields", {})})
    fields = {k: [p.get("fields", {}).get(k) for p in prompts] for k in names}
    scores = torch.tensor(call_reward(
        reward_fn, asked, texts, timeout=reward_cfg.timeout_seconds, cancelled=cancelled, **fields,
        truncated=truncated, messages=[p["messages"] for p in prompts],
        prompt_ids=[c.prompt_ids for c in completions], completion_ids=[c.token_ids for c in completions]),
        device=device)
    if penalize and getattr(reward_cfg, "truncation_penalty", 0.0):
        scores = scores + reward_cfg.truncation_penalty * torch.tensor([float(t) for t in truncated],
                                                                       device=device)
    return scores


def find_adapter(path_text: str, key: str, base_name: str):
    """The adapter a run folder, a checkpoint or an adapter folder holds (an
    :class:`align.artifacts.Artifact`), trained on the policy's base; ``key`` (``reward.adapter``,
    ``reward.also[0]``...) is named in errors."""
    from .artifacts import ArtifactError, resolve
    from .assets import resolve_model
    from .config import ConfigError

    if not path_text:
        raise ConfigError(f"key '{key}' is empty: name the `align rm` / `align dpo` run or adapter folder")
    try:
        found = resolve(path_text, what=f"key '{key}':")
    except ArtifactError:
        found = None
    if found is None or found.kind == "merged":
        raise ConfigError(f"key '{key}': '{path_text}' is neither an adapter folder nor a run folder "
                          "with adapter/ (train one with `align rm` or `align dpo`)")
    if found.base and resolve_model(found.base) != resolve_model(base_name):
        raise ConfigError(f"key '{key}': '{found.path}' was trained on '{found.base}', the policy's base is "
                          f"'{base_name}': a reward adapter must sit on the same base")
    return found


def template_suffix(tok) -> list[int]:
    """The tokens the chat template puts after the end-of-turn token (``\\n`` for ChatML): a
    reward model was trained on conversations that end with them."""
    turn = [{"role": "assistant", "content": "y"}]
    ids = tokenize_pair(tok, {"prompt": [{"role": "user", "content": "x"}], "chosen": turn, "rejected": turn})["chosen_ids"]
    return ids[ids.index(tok.eos_token_id) + 1:] if tok.eos_token_id in ids else []


class AdapterReward:
    """A frozen adapter role on the shared base, called like a reward function."""

    def __init__(self, roles, tok, role: str, kind: str, beta: float, source: Path, batch_size: int = 16):
        self.roles, self.tok, self.role, self.kind, self.beta = roles, tok, role, kind, beta
        self.batch_size, self.suffix = batch_size, template_suffix(tok)
        self.__qualname__ = f"{role} adapter ({kind}, {source})"
        self.__module__ = __name__

    @torch.no_grad()
    def __call__(self, prompts, completions, *, prompt_ids, completion_ids, truncated, **info) -> list[float]:
        was_training = self.roles.training
        self.roles.eval()

        def score(idx):
            if self.kind == "classifier":
                # A finished answer is scored where training scored it: after the template's closing tokens.
                rows = [Completion(prompt_ids[i], completion_ids[i] + ([] if truncated[i] else self.suffix),
                                   not truncated[i]) for i in idx]
                return self.roles.last_token_scores(rows_batch(rows, self.tok.pad_token_id, self.roles.device),
                                                    self.role).tolist()
            tb = rows_batch([Completion(prompt_ids[i], completion_ids[i], True) for i in idx],
                            self.tok.pad_token_id, self.roles.device)
            with self.roles.role(self.role):
                logp, _ = self.roles.token_logprobs(tb)
            with self.roles.role("reference"):
                ref, _ = self.roles.token_logprobs(tb)
            return (self.beta * ((logp - ref) * tb.mask).sum(1)).tolist()

        out = score_by_length(score, [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)], self.batch_size)
        self.roles.train(was_training)
        return out


class SumReward:
    """``reward`` plus its ``reward.also`` terms, each times its weight: one reward to the loop.
    Each term is validated as a reward function on its own (a bad term is named), and the
    last call's mean of each term is kept (``last_means``) so a run can show which one moved."""

    def __init__(self, terms: list[tuple[str, float, object]]):
        self.terms = terms
        self.last_means: dict[str, float] = {}
        self.__qualname__ = "reward sum (" + " + ".join(f"{w:g} x {name}" for name, w, _ in terms) + ")"
        self.__module__ = __name__

    def __call__(self, prompts, completions, **info) -> list[float | None]:
        """A term's ``None`` (no score) leaves it out of that sample's sum, as TRL sums its reward
        functions; a sample no term scored stays ``None``."""
        total: list[float | None] = [None] * len(completions)
        for name, weight, fn in self.terms:
            values = call_reward(fn, prompts, completions, **info)
            scored = [v for v in values if not math.isnan(v)]
            self.last_means[name] = sum(scored) / len(scored) if scored else math.nan
            total = [t if math.isnan(v) else (t or 0.0) + weight * v for t, v in zip(total, values)]
        return total
