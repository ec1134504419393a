"""Policy, reference, critic -- and reward models -- on ONE frozen base.

- policy    = PEFT adapter ``default`` (what gets exported)
- critic    = PEFT adapter ``value`` + a scalar value head (absent for critic-free advantages),
              or a head on the policy's own hidden states (``ppo.critic: shared``)
- reference = the same model with every adapter disabled
- scorers   = frozen adapters loaded from disk (reward model, judge): :class:`align.roles.Roles`
Switching roles is switching adapters; no second copy of the base is ever loaded -- except in
:class:`FullFineTuning` (``lora.r: full``), where the policy is the whole model and the
reference must be a frozen copy.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn as nn

from .. import distributed
from ..scoring.logprobs import token_logprobs
from ..models import POLICY, lora_peft_config
from ..roles import Roles

VALUE = "value"


class ActorCritic(Roles):
    """``critic``: ``separate`` (its own LoRA adapter ``value`` + head: a second pass, no
    interference with the policy) or ``shared`` (a head on the policy's hidden states: values
    come from the policy's own pass, and the value loss also trains the policy adapter)."""

    TRAINED = (POLICY, VALUE)

    def __init__(self, base, lora_cfg, with_critic: bool = True, critic: str = "separate"):
        super().__init__(base, lora_cfg)
        self.with_critic = with_critic
        self.shared_critic = with_critic and critic == "shared"
        if with_critic:
            if not self.shared_critic:
                self.model.add_adapter(VALUE, lora_peft_config(lora_cfg))
            self.value_head = nn.Linear(base.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self._role = None
        self.use_role("policy")

    @contextlib.contextmanager
    def role(self, role: str):
        if role == "value" and not (self.with_critic and not self.shared_critic):
            raise ValueError("this run has no critic adapter (critic-free advantage, or a shared critic)")
        with super().role(role) as me:
            yield me

    def policy_parameters(self):
        return [p for n, p in self.model.named_parameters() if "lora_" in n and f".{POLICY}." in n]

    def value_parameters(self):
        if not self.with_critic:
            return []
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n and f".{VALUE}." in n]
        return lora + list(self.value_head.parameters())

    def values(self, tb) -> torch.Tensor:
        with self.role("policy" if self.shared_critic else "value"):
            h = self.hidden_at(tb)
        return self.value_head(h.float()).squeeze(-1)

    def policy_pass(self, tb, with_entropy: bool = False, with_values: bool = True):
        """(log-probs, entropy, values or None) of the policy; with a shared critic the values
        come from the same forward pass, else the critic needs a pass of its own (skipped when
        not ``with_values``)."""
        with self.role("policy"):
            h = self.hidden_at(tb)
            logp, ent = token_logprobs(self.lm().get_output_embeddings()(h), tb.targets, with_entropy)
        if not self.with_critic or not (with_values or self.shared_critic):
            return logp, ent, None
        return logp, ent, (self.value_head(h.float()).squeeze(-1) if self.shared_critic else self.values(tb))

    def _trained(self, name: str) -> bool:
        return ("lora_" in name and (f".{POLICY}." in name or f".{VALUE}." in name)) or name.startswith("value_head.")

    def trained_state(self) -> dict:
        """Every weight training changes (policy, critic, value head), by name, whole and on the
        CPU: what a checkpoint must hold to continue exactly. Every rank must call it (FSDP2
        shards are gathered; only these weights move, never the base)."""
        return distributed.gathered_state(self, self._trained)

    def load_trained_state(self, state: dict, where: str = "checkpoint") -> None:
        params = dict(self.named_parameters())
        expected = {n for n in params if self._trained(n)}
        if set(state) != expected:
            odd = sorted(expected ^ set(state))[0]
            raise ValueError(f"{where} does not match this model/LoRA config (e.g. '{odd}')")
        for n, w in state.items():
            distributed.set_whole(params[n], w)

    def adapter_state(self, adapter: str = POLICY) -> dict:
        """PEFT adapter ``adapter``'s weights, whole (``save_policy``'s ``state``). Every rank
        must call it."""
        from ..adapters import adapter_weights

        return adapter_weights(self.model, adapter)

    def save_policy(self, folder, base_name: str, tok=None, state: dict | None = None):
        """The trained policy into ``folder``: ``adapter/``, a PEFT folder naming ``base_name``;
        ``state``: :meth:`adapter_state`, gathered beforehand on every rank when sharded."""
        from ..adapters import save_adapter

        return save_adapter(self.model, Path(folder) / "adapter", base_name, state_dict=state)

    def critic_state(self) -> dict:
        """The value head's weights, whole (every rank must call it)."""
        return distributed.gathered_state(self.value_head, lambda n: True) if self.with_critic else {}


class FullFineTuning(ActorCritic):
    """``lora.r: full``: every weight of ``base`` trains; the reference is a frozen copy made
    here (the one place align holds two copies of a base). The same interface as a critic-free
    :class:`ActorCritic`, so the PPO loop, the HF engine and the evaluations run unchanged;
    no adapter roles (config validation refuses critics, reward and judge adapters)."""

    TRAINED = ()

    def __init__(self, base):
        nn.Module.__init__(self)
        self.reference = copy.deepcopy(base).eval().requires_grad_(False)
        self.model = base.requires_grad_(True)
        self.score_heads = nn.ModuleDict()
        self.with_critic = self.shared_critic = False
        self._role = "policy"

    def use_role(self, role: str) -> None:
        if role not in ("policy", "reference"):
            raise ValueError(f"no role '{role}' in full fine-tuning (only policy and reference)")
        self._role = role

    @contextlib.contextmanager
    def role(self, role: str):
        self.use_role(role)
        try:
            yield self
        finally:
            self._role = "policy"

    def add_scorer(self, name, adapter_dir) -> bool:
        raise ValueError("full fine-tuning (lora.r=full) holds no adapter roles: a reward or judge "
                         "adapter needs a base that does not move")

    def lm(self):
        return self.reference if self._role == "reference" else self.model

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # frozen: never in training mode (dropout)
        return self

    def policy_parameters(self):
        return list(self.model.parameters())

    def _trained(self, name: str) -> bool:
        return name.startswith("model.")

    def trained_state(self) -> dict:
        # named_parameters, not the state dict: a tied head and embedding are one weight
        return {n: p.detach().clone() for n, p in self.named_parameters() if n.startswith("model.")}

    def adapter_state(self, adapter: str = "") -> dict | None:
        return None  # no adapter: the whole model is saved (never sharded: config check)

    def save_policy(self, folder, base_name: str, tok=None, state=None):
        """``model/``: a transformers folder with its tokenizer, loadable as a base or an export."""
        from ..atomic import atomic_dir

        with atomic_dir(Path(folder) / "model") as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        return Path(folder) / "model"
