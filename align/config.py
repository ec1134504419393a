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
    # Write a checkpoint every N optimizer steps / PPO iterations (0 = none); keep the last K.
    # A checkpoint holds everything to continue exactly: adapters, optimizer, scheduler, RNG
    # states, data position, PPO's KL controller.
    save_every: int = 0
    keep_last: int = 2
    # off | auto (continue the latest complete checkpoint if there is one) | must (the same,
    # but fail if there is none; `--resume` on the command line). The run folder is run.name's,
    # or the newest <job>-* folder in output_dir.
    resume: str = "off"
    # Steps whose loss or gradients are NaN/inf are skipped (no update) and counted; after this
    # many the run stops with an error, its last checkpoint intact.
    max_nonfinite_steps: int = 10
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


@dataclass
class PromptDataConfig:
    # A local JSONL/Parquet file or folder, a Hub id, or the mirror's `imdb-reviews` /
    # `Anthropic/hh-rlhf` (HH rows give their prompts).
    dataset: str = "imdb-reviews"
    # The row field holding the prompt: a string or a list of chat messages.
    text_field: str = "review"
    # Keep only the first N words of the field (0 = all): IMDB openings as prompts.
    first_words: int = 12
    # Wrapped in the chat template as one user turn; {text} is the field's text.
    template: str = "Continue this movie review in one or two sentences: {text}"
    subsets: list[str] = field(default_factory=list)
    # Rows [start:stop) of the source (0 = to the end): keep prompts apart from data a reward
    # model was fitted on.
    rows_start: int = 1200
    rows_stop: int = 2000
    # The first `eval_prompts` of those rows (after a seeded shuffle) are held out.
    eval_prompts: int = 64
    seed: int = 0


@dataclass
class RolloutConfig:
    # hf | vllm (in-process, one engine per trainer process) | vllm-server (a `vllm serve`
    # process that align starts, on rollout.server_devices: trainer and generator apart)
    engine: str = "hf"
    server_devices: str = ""  # CUDA_VISIBLE_DEVICES of the vllm-server process ("" = inherit)
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    # vLLM adapter sync: lora (swap in a new LoRARequest) | merged | auto
    sync: str = "lora"
    # Greedy-decode this many prompts in engine and trainer after each sync (0 = off).
    parity_prompts: int = 2
    parity_every: int = 1


@dataclass
class RewardConfig:
    # `path/to/file.py:function` or `package.module:function`.
    function: str = "reward.sentiment:positive_sentiment"
    # Added to the score of answers cut at max_new_tokens without an EOS (0 = no penalty).
    truncation_penalty: float = 0.0


@dataclass
class PPOTrainConfig:
    iterations: int = 40
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 2
    # An estimator of align/ppo/advantages.py: gae (actor-critic, a LoRA critic + value head),
    # grpo / rloo (critic-free group baselines, samples_per_prompt >= 2).
    advantage: str = "gae"
    learning_rate: float = 5e-4
    value_learning_rate: float = 5e-4
    ppo_epochs: int = 2
    minibatch_size: int = 16
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    # KL(policy || reference) penalty per token; adaptive control when kl_target > 0.
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float = 0.0
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    # Stop this batch's epochs once approx-KL(old||new) exceeds this (0 = never).
    target_approx_kl: float = 0.1
    eval_every: int = 5
    # Stop after the iteration that crosses this many minutes (0 = no budget), then evaluate.
    time_budget_minutes: float = 0.0


@dataclass
class PPOJobConfig:
    """`align ppo`: PPO with a custom reward; policy, reference and critic on one frozen base."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class RMTrainConfig:
    learning_rate: float = 5e-4
    batch_size: int = 8
    epochs: int = 1
    max_steps: int = 0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_length: int = 256


@dataclass
class RMJobConfig:
    """`align rm`: a LoRA reward model (TRL RewardTrainer) on preference pairs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: RMTrainConfig = field(default_factory=RMTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluate: bool = True


JOBS: dict[str, type] = {"dpo": DPOJobConfig, "ppo": PPOJobConfig, "rm": RMJobConfig}


# --------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------


class _Override:
    """A command-line value: YAML-parsed, with its raw text kept for string keys
    (``data.template={text}`` is a YAML mapping, but the key wants the text)."""

    def __init__(self, parsed: Any, raw: str):
        self.parsed, self.raw = parsed, raw


def _check_type(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float allowed) or raise naming ``key``."""
    if isinstance(value, _Override):
        try:
            return _check_type(value.parsed, tp, key, where)
        except ConfigError:
            is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            if tp is str or (is_union and str in typing.get_args(tp)):
                return value.raw
            raise
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
    return key.split("."), _Override(value, raw)


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

    if cfg.run.resume not in ("off", "auto", "must"):
        bad("run.resume", f"must be off, auto or must, got {cfg.run.resume!r}")
    for key in ("save_every", "keep_last", "max_nonfinite_steps"):
        if getattr(cfg.run, key) < 0:
            bad(f"run.{key}", f"must be >= 0, got {getattr(cfg.run, key)}")
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
    if isinstance(train, RMTrainConfig):
        for key in ("batch_size", "epochs", "max_length"):
            if getattr(train, key) <= 0:
                bad(f"train.{key}", f"must be > 0, got {getattr(train, key)}")
        if train.learning_rate <= 0:
            bad("train.learning_rate", f"must be > 0, got {train.learning_rate}")
    ppo = getattr(cfg, "ppo", None)
    if ppo is not None:
        for key in ("iterations", "prompts_per_iteration", "samples_per_prompt", "ppo_epochs",
                    "minibatch_size"):
            if getattr(ppo, key) <= 0:
                bad(f"ppo.{key}", f"must be > 0, got {getattr(ppo, key)}")
        batch = ppo.prompts_per_iteration * ppo.samples_per_prompt
        if batch % ppo.minibatch_size:
            bad("ppo.minibatch_size", f"must divide the batch of prompts_per_iteration x "
                f"samples_per_prompt = {batch}, got {ppo.minibatch_size}")
        if ppo.kl_estimator not in ("k1", "k3"):
            bad("ppo.kl_estimator", f"must be k1 or k3, got {ppo.kl_estimator!r}")
        if ppo.learning_rate <= 0:
            bad("ppo.learning_rate", f"must be > 0, got {ppo.learning_rate}")
    rollout = getattr(cfg, "rollout", None)
    if rollout is not None:
        from .rollout import ENGINES  # names only: no engine is imported

        if rollout.engine not in ENGINES:
            bad("rollout.engine", f"must be one of {', '.join(ENGINES)}, got {rollout.engine!r}")
        if rollout.sync not in ("lora", "merged", "auto"):
            bad("rollout.sync", f"must be lora, merged or auto, got {rollout.sync!r}")
        if rollout.max_new_tokens <= 0:
            bad("rollout.max_new_tokens", f"must be > 0, got {rollout.max_new_tokens}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
