"""Policy, reference, critic -- and reward models -- on ONE frozen base.

- policy    = PEFT adapter ``default`` (what gets exported)
- critic    = PEFT adapter ``value`` + a scalar value head (absent for critic-free advantages)
- reference = the same model with every adapter disabled
- scorers   = frozen adapters loaded from disk (``add_scorer``): an `align rm` reward model
              (LoRA + its score head) or a DPO adapter (its implicit reward needs the LM head)
Switching roles is switching adapters; no second copy of the base is ever loaded.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from ..logprobs import token_logprobs
from ..models import POLICY, add_policy_adapter, lora_peft_config

VALUE = "value"


class ActorCritic(nn.Module):
    def __init__(self, base, lora_cfg, with_critic: bool = True):
        super().__init__()
        self.model = add_policy_adapter(base, lora_cfg)
        self.with_critic = with_critic
        if with_critic:
            self.model.add_adapter(VALUE, lora_peft_config(lora_cfg))
            hidden = base.config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.score_heads = nn.ModuleDict()  # a scorer's head, by adapter name (frozen)
        self._role = None
        self.use_role("policy")

    # -- roles -------------------------------------------------------------------------
    def _train_all_adapters(self) -> None:
        # PEFT's set_adapter freezes the inactive adapter; policy and critic are both trained
        # (and only they: a scorer stays frozen), so set that again.
        for n, p in self.model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(f".{POLICY}." in n or f".{VALUE}." in n)

    def use_role(self, role: str) -> None:
        if role == self._role:
            return
        self.model.base_model.set_adapter({"policy": POLICY, "value": VALUE}.get(role, role))
        self._train_all_adapters()
        self._role = role

    def add_scorer(self, name: str, adapter_dir) -> bool:
        """Load a saved adapter as the frozen role ``name`` on this base; an `align rm` adapter's
        score head comes with it. Returns whether it has a score head (else it is a causal-LM
        adapter, e.g. DPO's). Its LoRA layout must fit the base (an error names it otherwise)."""
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        from ..adapters import WEIGHTS, AdapterError, check_weights, read_adapter_config

        cfg = read_adapter_config(adapter_dir)
        check_weights(adapter_dir)
        self.model.add_adapter(name, LoraConfig(
            r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"], lora_dropout=0.0,
            bias="none", task_type="CAUSAL_LM", use_rslora=cfg.get("use_rslora", False)))
        state = load_file(str(Path(adapter_dir) / WEIGHTS))
        head = {k: v for k, v in state.items() if ".score." in k or k.endswith("score.weight")}
        lora = {k: v for k, v in state.items() if k not in head}
        try:
            result = set_peft_model_state_dict(self.model, lora, adapter_name=name)
        except RuntimeError as e:
            raise AdapterError(f"adapter '{adapter_dir}' does not fit this base: {str(e).splitlines()[0]}") from e
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise AdapterError(f"adapter '{adapter_dir}' does not fit this base (e.g. "
                               f"{(missing or result.unexpected_keys)[0]})")
        if head:
            (weight,) = [v for k, v in head.items() if k.endswith("weight")]
            self.score_heads[name] = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            self.score_heads[name].weight.data.copy_(weight)
            self.score_heads[name].to(next(self.model.parameters()).device)
        for p in list(self.score_heads.parameters()):
            p.requires_grad_(False)
        self._role = None
        self.use_role("policy")
        return bool(head)

    @contextlib.contextmanager
    def role(self, role: str):
        """``policy`` | ``value`` | ``reference`` (adapters off). On exit the policy is active
        again: anything that generates from ``self.model`` (the HF engine) must sample from the
        policy, never from the critic's adapter."""
        if role == "value" and not self.with_critic:
            raise ValueError("this run has no critic (critic-free advantage)")
        if role not in ("policy", "value", "reference") and role not in self.model.peft_config:
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
        return self.value_head.weight.device if self.with_critic else next(self.model.parameters()).device

    def policy_parameters(self):
        return [p for n, p in self.model.named_parameters() if "lora_" in n and f".{POLICY}." in n]

    def value_parameters(self):
        if not self.with_critic:
            return []
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n and f".{VALUE}." in n]
        return lora + list(self.value_head.parameters())

    # -- forward passes ----------------------------------------------------------------
    def lm(self):
        """The causal LM that runs for the active role (here: PEFT's wrapped base)."""
        return self.model.get_base_model()

    def hidden_at(self, input_ids, attention_mask, pred_pos) -> torch.Tensor:
        """Hidden states (B, T, H) at the positions that predict each completion token."""
        backbone = self.lm().base_model  # LlamaModel, GPTNeoXModel, ...: whatever the architecture calls it
        h = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return h.gather(1, pred_pos.unsqueeze(-1).expand(-1, -1, h.size(-1)))

    def token_logprobs(self, input_ids, attention_mask, pred_pos, targets, with_entropy=False):
        """log p(target) per completion token under the active role (policy or reference)."""
        h = self.hidden_at(input_ids, attention_mask, pred_pos)
        return token_logprobs(self.lm().get_output_embeddings()(h), targets, with_entropy)

    def values(self, input_ids, attention_mask, pred_pos) -> torch.Tensor:
        with self.role("value"):
            h = self.hidden_at(input_ids, attention_mask, pred_pos)
        return self.value_head(h.float()).squeeze(-1)

    def trained_state(self) -> dict:
        """Every weight training changes (both adapters, the value head), by name: what a
        checkpoint must hold to continue exactly."""
        return {n: p.detach().clone() for n, p in self.named_parameters()
                if ("lora_" in n and (f".{POLICY}." in n or f".{VALUE}." in n)) or n.startswith("value_head.")}

    def load_trained_state(self, state: dict, where: str = "checkpoint") -> None:
        params = dict(self.named_parameters())
        expected = set(self.trained_state())
        if set(state) != expected:
            odd = sorted(expected ^ set(state))[0]
            raise ValueError(f"{where} does not match this model/LoRA config (e.g. '{odd}')")
        with torch.no_grad():
            for n, w in state.items():
                params[n].copy_(w)

    def critic_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.value_head.state_dict().items()} if self.with_critic else {}
