"""Roles on ONE frozen base: every role is a LoRA adapter on the same weights, or none of them.

- ``policy``: PEFT's ``default`` adapter (trained and exported by PPO; the untouched base when
  nothing trained it: LoRA's B starts at zero);
- ``reference``: every adapter switched off -- the base itself;
- any other name: a frozen adapter loaded from disk (:meth:`Roles.add_scorer`) -- an `align rm`
  reward model (LoRA + its score head), a DPO adapter, a run's policy to evaluate.

Switching roles is switching adapters; no second copy of the base is ever made. The PPO
actor-critic (:mod:`align.ppo.actor_critic`) adds a trained critic; `align eval` and the reward
kinds (:mod:`align.scorers`) use roles as they are.
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.nn as nn

from .scoring.logprobs import token_logprobs
from .scoring.batch import end_states
from .models import POLICY, add_policy_adapter


class Roles(nn.Module):
    TRAINED: tuple[str, ...] = ()  # adapters that train (the rest stay frozen whatever is active)

    def __init__(self, base, lora_cfg):
        super().__init__()
        self.model = add_policy_adapter(base, lora_cfg)
        self.score_heads = nn.ModuleDict()  # a scorer's head, by adapter name (frozen)
        self._adapters: dict[str, str] = {}  # a loaded role's name -> its PEFT adapter's
        self._role = None
        self.use_role("policy")

    def _set_trainable(self) -> None:
        # PEFT's set_adapter freezes the inactive adapters and unfreezes the active one: only
        # the adapters in TRAINED may train, whichever is active.
        for n, p in self.model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(any(f".{a}." in n for a in self.TRAINED))

    def adapter_of(self, role: str) -> str:
        return POLICY if role == "policy" else self._adapters.get(role, role)

    def _new_adapter_name(self, role: str) -> str:
        """A PEFT adapter name for ``role``: a role is named after a run folder or a path, and PEFT
        (a torch ModuleDict) takes no "." in a name -- `align eval runs/lr1e-3.v2` must still load."""
        name = re.sub(r"[^A-Za-z0-9_-]", "_", role)
        taken = set(self.model.peft_config) | set(self._adapters.values())
        out, i = name, 1
        while out in taken:
            out, i = f"{name}_{i}", i + 1
        return out

    def use_role(self, role: str) -> None:
        if role == self._role:
            return
        self.model.base_model.set_adapter(self.adapter_of(role))
        self._set_trainable()
        self._role = role

    def add_scorer(self, name: str, adapter_dir) -> bool:
        """Load a saved adapter as the frozen role ``name``; an `align rm` adapter's score head
        comes with it. Returns whether it has a score head (else it is a causal-LM adapter, e.g.
        DPO's). Its LoRA layout must fit the base (an error names it otherwise)."""
        from .adapters import load_named_adapter

        if name in self._adapters or name in ("policy", "reference"):
            raise ValueError(f"a role named '{name}' is already loaded")
        adapter = self._new_adapter_name(name)
        head = load_named_adapter(self.model, adapter, adapter_dir)
        self._adapters[name] = adapter
        if head is not None:
            self.score_heads[adapter] = head.to(self.device)
        self._role = None
        self.use_role("policy")
        return head is not None

    @contextlib.contextmanager
    def role(self, role: str):
        """``policy`` | ``reference`` (adapters off) | a loaded role. On exit the policy is
        active again: anything that generates from ``self.model`` (the HF engine) must sample
        from the policy, never from another role's adapter."""
        if role not in ("policy", "reference") and self.adapter_of(role) not in self.model.peft_config:
            raise ValueError(f"no adapter for role '{role}'")
        try:
            if role == "reference":
                self.use_role("policy")
                with self.model.disable_adapter():
                    yield self
            else:
                self.use_role(role)
                yield self
        finally:
            self.use_role("policy")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- forward passes ----------------------------------------------------------------
    def lm(self):
        """The causal LM that runs for the active role (PEFT's wrapped base)."""
        return self.model.get_base_model()

    def hidden_at(self, tb) -> torch.Tensor:
        """Hidden states (B, T, H) at the positions that predict each answer token of the
        :class:`~align.scoring.batch.TokenBatch` ``tb`` (one row per sample, or packed groups)."""
        lm = self.lm()
        h = lm.base_model(**tb.model_inputs(lm.config, lm.get_input_embeddings().weight.dtype),
                          use_cache=False).last_hidden_state
        return h[tb.row[:, None], tb.pred_pos]

    def token_logprobs(self, tb, with_entropy=False):
        """log p(target) per answer token under the active role."""
        return token_logprobs(self.lm().get_output_embeddings()(self.hidden_at(tb)), tb.targets, with_entropy)

    def last_token_scores(self, tb, role: str) -> torch.Tensor:
        """A reward model's scores (B,): its head on each answer's last token (either layout)."""
        with self.role(role):
            h = end_states(self.lm(), tb)
        return self.score_head(role)(h.float()).squeeze(-1)

    def score_head(self, role: str) -> nn.Module:
        """The score head a reward-model role brought with it."""
        return self.score_heads[self.adapter_of(role)]
