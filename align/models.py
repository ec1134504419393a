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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# CPU features that make bf16 matmuls native (oneDNN uses them); without one, bf16 is emulated
BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")


def cpu_bf16_feature(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first of :data:`BF16_CPU_FEATURES` this CPU lists (``/proc/cpuinfo``), or None
    (also where the flags cannot be read: assume none rather than risk an emulated, slower bf16)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((feature for feature in BF16_CPU_FEATURES if feature in flags), None)


def auto_dtype(device: str = "auto") -> tuple[str, str]:
    """``model.dtype: auto``: (the fastest correct dtype on this machine, why). bf16 where the
    hardware computes it natively -- a GPU that supports it, a CPU with avx512_bf16 / AMX --
    float32 elsewhere (emulated bf16 is slower than float32: see results/bench_dtype.json)."""
    if resolve_device(device).type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "GPU with bf16"
        return "float32", "GPU without bf16"
    feature = cpu_bf16_feature()
    if feature:
        return "bfloat16", feature
    return "float32", f"this CPU has no {' / '.join(BF16_CPU_FEATURES)}: bf16 would be emulated"


def resolve_dtype(name: str, device: str = "auto") -> str:
    """``model.dtype`` as a concrete dtype (``auto``: :func:`auto_dtype`). Jobs resolve it once,
    when the run starts (:func:`align.runs.start_run` records it in ``run.json``)."""
    return auto_dtype(device)[0] if name == "auto" else name


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


def resolve_device(name: str) -> torch.device:
    """``model.device``; ``auto`` (and ``cuda``) is this process's GPU (LOCAL_RANK)."""
    import os

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but torch sees no GPU (torch.cuda.is_available() is False)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


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
    """Load the frozen base model (Hub id, mirror, local folder or GGUF) and its tokenizer.
    ``kind``: ``causal`` (a causal LM) or ``classifier`` (the same backbone with a 1-output
    score head, for reward models)."""
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
        model = auto.from_pretrained(where, dtype=_DTYPES[resolve_dtype(model_cfg.dtype)],
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
