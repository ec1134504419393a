"""Adapter I/O, one way for every job, engine and export.

An adapter folder is a standard PEFT folder (``adapter_config.json`` + safetensors) whose
``base_model_name_or_path`` is the base as users know it (a Hub id), never a mirror path, so
the folder loads anywhere PEFT does. Loading puts an adapter on a base loaded by
:func:`align.models.load_base`, so GGUF files, the mirror and offline errors work the same.
"""
from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_dir, atomic_write_text

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter folder that cannot be used as asked; the message names the file."""


def save_adapter(peft_model, out_dir, base_name: str, adapter_name: str = "default",
                 tokenizer=None, state_dict: dict | None = None) -> Path:
    """Write adapter ``adapter_name`` as a PEFT folder (safetensors), atomically, naming the base
    as users know it (and the tokenizer beside it, when given). The base name is patched in
    after saving: handing PEFT a Hub id makes it look the base up on the Hub at every save
    (every PPO sync). ``state_dict``: the adapter's weights gathered whole beforehand
    (:func:`align.distributed.gathered_state`), required where the model is sharded (FSDP2):
    the one rank that writes cannot gather alone."""
    if state_dict is None and any(hasattr(p, "full_tensor") for p in peft_model.parameters()):
        raise RuntimeError(f"save_adapter('{out_dir}'): the model is sharded (FSDP2); gather the adapter on "
                           "every rank first (align.distributed.gathered_state) and pass it as state_dict")
    with atomic_dir(out_dir) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True,
                                   **({"state_dict": state_dict} if state_dict is not None else {}))
        if adapter_name != "default":  # PEFT writes a non-default adapter into a sub-folder
            sub = tmp / adapter_name
            for f in sub.iterdir():
                f.rename(tmp / f.name)
            sub.rmdir()
        set_base_name(tmp, base_name)
    return Path(out_dir)


def adapter_weights(peft_model, adapter_name: str = "default") -> dict:
    """Adapter ``adapter_name``'s weights -- its LoRA matrices and the modules it trains whole (a
    reward model's score head) -- whole and on the CPU, keyed as ``peft_model``'s state dict
    (:func:`save_adapter`'s ``state_dict``). Every rank must call it: where the model is
    sharded (FSDP2) the adapter's shards are gathered -- the adapter only, never the base."""
    from . import distributed

    return distributed.gathered_state(
        peft_model, lambda n: ("lora_" in n or "modules_to_save" in n) and f".{adapter_name}." in n)


def read_adapter_config(adapter_dir) -> dict:
    """``adapter_config.json``, checked: valid JSON, rank and alpha > 0."""
    f = Path(adapter_dir) / CONFIG
    if not f.is_file():
        raise AdapterError(f"adapter file '{f}' is missing")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"'{f}' is not valid JSON: {e}") from e
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise AdapterError(f"'{f}': '{key}' must be > 0, got {cfg.get(key)!r}")
    return cfg


def read_base_name(adapter_dir) -> str | None:
    return read_adapter_config(adapter_dir).get("base_model_name_or_path")


def set_base_name(adapter_dir, base_name: str, **extra) -> None:
    """Put ``base_name`` (and any ``extra`` keys, e.g. ``inference_mode``) into the config."""
    f = Path(adapter_dir) / CONFIG
    cfg = json.loads(f.read_text())
    cfg["base_model_name_or_path"] = base_name
    cfg.update(extra)
    atomic_write_text(f, json.dumps(cfg, indent=2))


def check_weights(adapter_dir) -> None:
    """Read every tensor once: a truncated or corrupt file fails here, naming itself."""
    from safetensors import safe_open

    path = Path(adapter_dir) / WEIGHTS
    if not path.is_file():
        raise AdapterError(f"adapter file '{path}' is missing")
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception as e:
        raise AdapterError(f"'{path}' is truncated or corrupt: {e}") from e


def load_named_adapter(peft_model, name: str, adapter_dir):
    """Load a saved adapter into ``peft_model`` (a causal LM's PEFT model) as the frozen
    adapter ``name`` -- so several adapters share one base. A reward model's adapter (`align rm`,
    a sequence classifier: LoRA on the same backbone + a score head) brings its head, returned
    as a frozen ``nn.Linear``; a causal-LM adapter returns None. An adapter whose LoRA layout does
    not fit the base is an error naming it."""
    import torch
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = read_adapter_config(adapter_dir)
    check_weights(adapter_dir)
    peft_model.add_adapter(name, LoraConfig(
        r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"], lora_dropout=0.0,
        bias="none", task_type="CAUSAL_LM", use_rslora=cfg.get("use_rslora", False)))
    state = load_file(str(Path(adapter_dir) / WEIGHTS))
    head = {k: v for k, v in state.items() if ".score." in k or k.endswith("score.weight")}
    try:
        result = set_peft_model_state_dict(peft_model, {k: v for k, v in state.items() if k not in head},
                                           adapter_name=name)
    except RuntimeError as e:
        raise AdapterError(f"adapter '{adapter_dir}' does not fit this base: {str(e).splitlines()[0]}") from e
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if missing or result.unexpected_keys:
        raise AdapterError(f"adapter '{adapter_dir}' does not fit this base (e.g. {(missing or result.unexpected_keys)[0]})")
    for n, p in peft_model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)
    if not head:
        return None
    (weight,) = [v for k, v in head.items() if k.endswith("weight")]
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    return linear.requires_grad_(False)


def load_with_adapter(base_name: str, adapter_dir=None, *, kind: str = "causal", dtype: str = "auto",
                      device: str = "auto"):
    """(model, tokenizer): the base (``kind`` causal LM or 1-output ``classifier``) with the
    adapter at ``adapter_dir`` on it, in eval mode -- what a user of the folder would load (export
    verification, ``ALIGN_REWARD_MODEL``). The other way in, :func:`load_named_adapter`, adds a
    frozen role to a base that other roles share. ``dtype`` and ``device``: as ``model.dtype`` /
    ``model.device`` (:mod:`align.placement`)."""
    from .config import ModelConfig
    from .models import load_base

    from peft import PeftModel

    base, tok = load_base(ModelConfig(name=base_name, dtype=dtype, device=device), kind=kind)
    model = base
    if adapter_dir is not None:
        try:
            model = PeftModel.from_pretrained(base, str(adapter_dir))  # PEFT's own loader: as a user loads it
        except RuntimeError as e:
            if "size mismatch" in str(e):
                raise AdapterError(f"adapter '{adapter_dir}' does not fit base '{base_name}' (trained on another "
                                   f"base?): {str(e).splitlines()[0]}") from e
            raise
    model.eval()
    return model, tok
