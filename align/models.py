"""Models and roles: ONE frozen base; roles are adapters on it, never second copies.

- ``policy``: a LoRA adapter (default r=8 on all linear layers, attention + MLP).
- reference: the same base with adapters disabled (:func:`reference_mode`).
- critic / reward: further named adapters on the same base (PPO and RM jobs).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .assets import AssetError, check_hub, offline_hint, resolve_model

def resolve_attention(choice: str, config) -> str:
    """``model.attention`` for this model. transformers' sdpa path drops attention logit
    softcapping (Gemma-2): the model would silently compute something else than it defines
    (measured: vLLM, which applies it, then disagrees by up to 1 nat per token). So ``auto``
    picks eager there, and an explicit sdpa is refused."""
    softcap = getattr(config, "attn_logit_softcapping", None)
    if choice == "auto":
        return "eager" if softcap else "sdpa"
    if softcap and choice == "sdpa":
        from .config import ConfigError

        raise ConfigError(f"key 'model.attention': sdpa would drop {type(config).__name__}'s attention "
                          f"logit softcapping ({softcap}); use eager (model.attention=auto picks it)")
    return choice


def _split_gguf(path: str) -> tuple[str, dict]:
    """A ``.gguf`` file loads through its folder plus ``gguf_file=``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    where, extra = _split_gguf(resolve_model(name))
    if where == name:
        check_hub(name, "model")
    try:
        tok = AutoTokenizer.from_pretrained(where, **extra)
    except OSError as e:
        raise AssetError(f"{offline_hint(name, 'model')} ({e})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model_cfg, *, with_tokenizer: bool = True, kind: str = "causal"):
    """Load the frozen base model (Hub id, mirror, local folder or GGUF) and its tokenizer, on
    ``model.device`` in ``model.dtype`` (:func:`align.placement.place`: the one decision).
    ``kind``: ``causal`` (a causal LM) or ``classifier`` (the same backbone with a 1-output
    score head, for reward models)."""
    from .placement import place

    where_to = place(getattr(model_cfg, "device", "auto"), model_cfg.dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in ("causal", "classifier"):
        raise ValueError(f"load_base: kind must be causal or classifier, got {kind!r}")
    auto, extra_kw = ((AutoModelForCausalLM, {}) if kind == "causal"
                      else (AutoModelForSequenceClassification, {"num_labels": 1}))
    resolved = resolve_model(model_cfg.name)
    where, extra = _split_gguf(resolved)
    if where == model_cfg.name:  # not local, not in the mirror: only the Hub has it
        check_hub(model_cfg.name, "model")
    try:
        config = AutoConfig.from_pretrained(where, **extra)
        model = auto.from_pretrained(where, dtype=where_to.torch_dtype,
                                     attn_implementation=resolve_attention(model_cfg.attention, config),
                                     **extra, **extra_kw)
    except OSError as e:
        raise AssetError(f"{offline_hint(model_cfg.name, 'model')} ({e})") from e
    except Exception as e:
        if extra.get("gguf_file"):  # the GGUF reader fails deep inside on a cut-off file
            raise AssetError(f"model.name '{resolved}': the GGUF file is truncated or corrupt "
                             f"({type(e).__name__}: {e})") from e
        raise
    if extra.get("gguf_file"):
        # A GGUF dequantizes to a normal model; drop the markers so PEFT/saving treat it as one.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.config.use_cache = True
    from . import distributed

    distributed.share_loaded_weights(model)  # before any pass: every rank computes with rank 0's weights
    model.to(where_to.device)
    if getattr(model_cfg, "gradient_checkpointing", False):
        # non-reentrant: gradients reach the LoRA weights although the frozen inputs need none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(model_cfg.name) if with_tokenizer else None
    if tok is not None:
        if kind == "classifier" and model.config.pad_token_id is None:  # it scores the last non-pad token
            model.config.pad_token_id = tok.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id
    return model, tok


def lora_peft_config(lora_cfg, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        bias="none",
        task_type=task_type,
    )


# The policy is PEFT's "default" adapter: TRL and PEFT's save/load treat that one as *the* adapter.
POLICY = "default"


def add_policy_adapter(base, lora_cfg, name: str = POLICY):
    """Wrap ``base`` in a PEFT model with a fresh LoRA adapter ``name`` (the trainable policy)."""
    from peft import get_peft_model

    model = get_peft_model(base, lora_peft_config(lora_cfg), adapter_name=name)
    return model


@contextlib.contextmanager
def reference_mode(peft_model):
    """The reference policy: the same weights with every adapter switched off."""
    with peft_model.disable_adapter():
        yield peft_model


def live_copies(weight) -> int:
    """How many distinct storages *in this whole process* hold ``weight``'s values (in any
    dtype): every live tensor is looked at after a garbage collection, not one module tree, so a
    base loaded a second time elsewhere counts. In a process that loaded one base, 1 = no second
    copy; where others hold the same weights (a test session), compare with a count taken before."""
    import gc

    gc.collect()
    want = weight.detach().float()
    storages = set()
    for obj in gc.get_objects():
        # plain tensors and parameters only: compilers' fake and symbolic tensors hold no data
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.shape != weight.shape \
                or obj.is_meta or not obj.is_floating_point():
            continue
        t = obj.detach()
        if torch.allclose(t.float(), want, rtol=1e-2, atol=1e-2):
            storages.add(t.untyped_storage().data_ptr())
    return len(storages)
