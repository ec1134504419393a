"""Job configurations: one dataclass per job is the single source of defaults.

A config comes from YAML plus ``a.b=c`` overrides on the command line. Unknown keys and
wrong types raise :class:`ConfigError` naming the file and the dotted key, so a typo never
silently falls back to a default. This module imports no job; jobs import it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the file and key at fault."""


# --------------------------------------------------------------------------------------
# Sections shared by the jobs
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # A Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), a local HF folder or a ``.gguf`` file.
    # Hub ids are looked up in the offline mirror first (see align/assets.py).
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # fp32 on CPU: this CPU has no avx512_bf16 and bf16 matmuls are ~4x slower.
    dtype: str = "float32"
    # CPU threads for torch; 0 = leave torch's default.
    threads: int = 0


@dataclass
class LoraConfig:
    # "LoRA Without Regret": rank 1-8 suffices for RL and preference tuning; all linear
    # layers (attention + MLP) matter more than the rank.
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class DataConfig:
    # A Hub id (``Anthropic/hh-rlhf``), a local folder, or a JSONL/Parquet file.
    dataset: str = "Anthropic/hh-rlhf"
    # HH-RLHF subsets to train on; evaluation uses *different* subsets so that it is held out.
    train_subsets: list[str] = field(
        default_factory=lambda: ["harmless-base", "helpful-rejection-sampled"]
    )
    eval_subsets: list[str] = field(default_factory=lambda: ["helpful-base"])
    # For non-HH datasets: file/split names for train and eval (empty = all / none).
    train_split: str = "train"
    eval_split: str = ""
    max_train_pairs: int = 1000
    max_eval_pairs: int = 500
    # Raise on the first bad row instead of counting and skipping it.
    strict: bool = False
    seed: int = 0


@dataclass
class RunConfig:
    # Each run gets ``<output_dir>/<name or timestamp>``.
    output_dir: str = "runs"
    name: str = ""
    seed: int = 0
    # Write a checkpoint every N optimizer steps (0 = only at the end); keep the last K.
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 1
    plot: bool = True


@dataclass
class DPOTrainConfig:
    beta: float = 0.1
    # LoRA's best LR is ~10x full fine-tuning's (LoRA Without Regret). Measured on this CPU
    # (SmolLM2-135M, r=8): 5e-5 left the loss at 0.693 for 75 steps; 5e-4 moved it.
    learning_rate: float = 5e-4
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # 0 = as many as epochs give
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Truncation: the prompt keeps its *last* tokens (latest turns), answers their first.
    max_length: int = 384
    max_prompt_length: int = 256
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


@dataclass
class DPOJobConfig:
    """`align dpo`: TRL DPO of a LoRA policy against the same base with adapters off."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Evaluate on the held-out subsets at the end of training.
    evaluate: bool = True


JOBS: dict[str, type] = {"dpo": DPOJobConfig}


# --------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------


def _check_type(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float allowed) or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: key '{key}' expects {_tp_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}' expects a list, got {value!r}")
        return [_check_type(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: key '{key}' expects null, got {value!r}")
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{where}: key '{key}' expects {tp.__name__}, got {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(
                f"{where}: key '{key}' expects {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise ConfigError(f"{where}: key '{key}' has an unsupported type {tp}")


def _tp_name(tp: Any) -> str:
    args = typing.get_args(tp)
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) if args else str(tp)


def _build(cls: type, data: dict, prefix: str, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section '{prefix or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"{where}: unknown key '{key}' (known in this section: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", where)
        else:
            kwargs[name] = _check_type(value, tp, f"{prefix}{name}", where)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    # YAML parses numbers, booleans, lists ("[a, b]") and null the way a config file would.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge(into: dict, path: list[str], value: Any) -> None:
    node = into
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
    node[path[-1]] = value


def load_config(job: str, path: str | Path | None = None, overrides: list[str] = ()):
    """Build the job's config from an optional YAML file and ``a.b=c`` overrides."""
    if job not in JOBS:
        raise ConfigError(f"unknown job '{job}' (known: {', '.join(JOBS)})")
    data: dict = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for text in overrides:
        keys, value = _parse_override(text)
        _merge(data, keys, value)
    if overrides:
        where = f"{where} + command-line overrides"
    cfg = _build(JOBS[job], data, "", where)
    validate(cfg, where)
    return cfg


def validate(cfg, where: str = "config") -> None:
    """Value checks that types alone cannot express; each names the key."""

    def bad(key: str, why: str):
        raise ConfigError(f"{where}: key '{key}' {why}")

    lora = getattr(cfg, "lora", None)
    if lora is not None:
        if lora.r <= 0:
            bad("lora.r", f"must be > 0, got {lora.r}")
        if lora.alpha <= 0:
            bad("lora.alpha", f"must be > 0, got {lora.alpha}")
        if not 0.0 <= lora.dropout < 1.0:
            bad("lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    model = getattr(cfg, "model", None)
    if model is not None and model.dtype not in ("float32", "bfloat16", "float16"):
        bad("model.dtype", f"must be float32, bfloat16 or float16, got {model.dtype!r}")
    train = getattr(cfg, "train", None)
    if isinstance(train, DPOTrainConfig):
        for key in ("batch_size", "grad_accum", "epochs", "max_length", "max_prompt_length"):
            if getattr(train, key) <= 0:
                bad(f"train.{key}", f"must be > 0, got {getattr(train, key)}")
        if train.learning_rate <= 0:
            bad("train.learning_rate", f"must be > 0, got {train.learning_rate}")
        if train.max_prompt_length >= train.max_length:
            bad("train.max_prompt_length", "must be smaller than train.max_length")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
