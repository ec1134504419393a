"""Job configurations: one dataclass per job is the single source of defaults.

A config comes from YAML plus ``a.b=c`` overrides on the command line. Unknown keys and
wrong types raise :class:`ConfigError` naming the file and the dotted key, so a typo never
silently falls back to a default. This module imports no job; jobs import it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the file and key at fault."""


# --------------------------------------------------------------------------------------
# Declared ranges: every numeric key says what it accepts, checked for every job
# --------------------------------------------------------------------------------------


def _num(default, lo=None, hi=None, *, lo_open=False, hi_open=False):
    """A numeric key with its valid range (None = unbounded; *_open = that end excluded).
    Floats must also be finite: a NaN learning rate is a typo, never a setting."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


# Upper bounds: plausible, not merely finite. A value past them is a typo (1e10 for 1e-4), and
# one that trains anyway leaves a garbage adapter with a clean exit.
BIG = 10_000_000          # counts: pairs, steps, prompts
HUGE = 1_000_000_000      # row indices, horizons
MAX_TOKENS = 1 << 20      # token lengths
SEED_MAX = 2**32 - 1      # numpy's seeds


def _lr(default):
    """A learning rate: LoRA's best are ~1e-5..1e-2; above 1 every optimizer step moves weights
    by more than their own size. (A rate in range can still diverge: the runs' divergence guard
    stops those.)"""
    return _num(default, 0, 1.0, lo_open=True)


def _read_utf8(path: Path) -> str:
    """A config file's text (a byte-order mark dropped); a byte that is not UTF-8 is named by its
    line and offset, not a decoder's chunk-relative position."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise ConfigError(f"{path}:{line}: not UTF-8: byte 0x{data[e.start]:02x} at byte {col} of the line "
                          f"({e.start} of the file); save the file as UTF-8") from None


def _choice(default, *choices):
    return field(default=default, metadata={"choices": choices})


# --------------------------------------------------------------------------------------
# Sections shared by the jobs
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # A Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), a local HF folder or a ``.gguf`` file.
    # Hub ids are looked up in the offline mirror first (see align/assets.py).
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # auto: the fastest correct dtype on the machine the run starts on (align.placement.auto_dtype):
    # bfloat16 on a GPU with bf16 and on a CPU with native bf16 (avx512_bf16 / amx_bf16), else
    # float32 (emulated bf16 measured ~100x slower than fp32 on an AVX2-only CPU:
    # results/bench_dtype.json). Printed at start, recorded in run.json, kept on resume. bfloat16:
    # the frozen base in bf16, LoRA weights, value head and optimizer state in fp32, log-probs in
    # fp32. The engine (vLLM) runs the same dtype. Caveat: the GRPO smoke run in bf16 on such a
    # CPU learned at one seed of two (docs/gpus.md, "dtype"): the arithmetic/smoke configs pin float32.
    dtype: str = _choice("auto", "auto", "float32", "bfloat16", "float16")
    # auto: this process's GPU (LOCAL_RANK) when there is one, else the CPU.
    device: str = _choice("auto", "auto", "cpu", "cuda")
    # The attention backend. auto: sdpa, or eager for models whose attention sdpa would change
    # (Gemma-2's logit softcapping). sdpa and eager score DPO pairs packed (one row per pair);
    # flash_attention_2 / flex_attention take no custom mask, so pairs become two rows there.
    attention: str = _choice("auto", "auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
    # CPU threads for torch; 0 = leave torch's default.
    threads: int = _num(0, 0, 1024)
    # Recompute each layer's activations in the backward pass instead of keeping them: about a
    # third more compute for a fraction of the activation memory -- for long sequences or large
    # batches on a GPU (torch's non-reentrant checkpointing, through transformers).
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    # "LoRA Without Regret": rank 1-8 suffices for RL and preference tuning; all linear
    # layers (attention + MLP) matter more than the rank.
    # ``full`` (align ppo only): no adapter -- every weight of the model trains and the reference
    # is a frozen copy of the base, the one exception to "one copy of the base" (2 copies +
    # gradients + Adam's 2 moments: ~5x the weights' bytes; refused where memory would not
    # hold it). Critic-free advantages (grpo, rloo), a Python reward and the hf engine only;
    # the run saves model/ (a transformers folder) instead of adapter/. For comparing LoRA
    # with full fine-tuning (scripts/lora_without_regret.py).
    r: int | str = _num(8, 0, 1024, lo_open=True)
    # Fixed across ranks: the update is scaled by alpha / r (the 1/r scaling under which the
    # best learning rate hardly depends on the rank).
    alpha: int = _num(16, 0, 4096, lo_open=True)
    # Dropout on the LoRA input (0 = none; RL and DPO runs here use none).
    dropout: float = _num(0.0, 0.0, 1.0, hi_open=True)
    # Which linear layers get an adapter: all-linear (attention + MLP), or a list of module
    # names (e.g. [q_proj, v_proj]).
    target_modules: str | list[str] = "all-linear"


@dataclass
class DataConfig:
    # A Hub id (``Anthropic/hh-rlhf``), a local folder, or a JSONL/Parquet file.
    dataset: str = "Anthropic/hh-rlhf"
    # HH-RLHF subsets to train on; evaluation uses *different* subsets so that it is held out.
    # harmless-base is left out by default: its preferences favour refusing, which pulls against
    # the helpfulness evaluated on helpful-base (with half the pairs from it, accuracy was 0.518).
    train_subsets: list[str] = field(default_factory=lambda: ["helpful-rejection-sampled"])
    # HH-RLHF subsets evaluated on (held out: never trained on).
    eval_subsets: list[str] = field(default_factory=lambda: ["helpful-base"])
    # For non-HH datasets: file/split names for train and eval (empty = all / none).
    train_split: str = "train"
    # For non-HH datasets: the file/split name of held-out pairs ("" = none).
    eval_split: str = ""
    max_train_pairs: int = _num(1000, 0, BIG)  # 0 = all
    # Held-out pairs evaluated (0 = all).
    max_eval_pairs: int = _num(500, 0, BIG)
    # Which training rows: all, or one of two fixed halves (a stable hash of each row's file and
    # line): models trained on half-a and half-b never saw each other's pairs (e.g. a PPO reward
    # model and the independent judge of its policy).
    train_rows: str = _choice("all", "all", "half-a", "half-b")
    # Hold out this many of the training pairs (seeded) as a validation split: tune on these,
    # never on the evaluation subsets.
    validation_pairs: int = _num(0, 0, BIG)
    # Raise on the first bad row instead of counting and skipping it.
    strict: bool = False
    # Seed of the data's shuffle, subsampling and validation hold-out.
    seed: int = _num(0, 0, SEED_MAX)


@dataclass
class RunConfig:
    # Each run gets ``<output_dir>/<name or timestamp>``.
    output_dir: str = "runs"
    # The run folder's name under output_dir ("" = <job>-<timestamp>); a name, never a path.
    name: str = ""
    # Seed of torch, numpy and Python's RNGs (sampling, initialisation, dropout).
    seed: int = _num(0, 0, SEED_MAX)
    # Write a checkpoint every N optimizer steps / PPO iterations (0 = none); keep the last K.
    # A checkpoint holds everything to continue exactly: adapters, optimizer, scheduler, RNG
    # states, data position, PPO's KL controller.
    save_every: int = _num(0, 0, BIG)
    # Checkpoints kept (the newest K; older ones are deleted as new ones land).
    keep_last: int = _num(2, 1, 1000)
    # off | auto (continue the latest complete checkpoint if there is one) | must (the same,
    # but fail if there is none; `--resume` on the command line). The run folder is run.name's,
    # or the newest <job>-* folder in output_dir.
    resume: str = _choice("off", "off", "auto", "must")
    # Steps whose loss or gradients are NaN/inf are skipped (no update) and counted; after this
    # many the run stops with an error, its last checkpoint intact.
    max_nonfinite_steps: int = _num(10, 0, BIG)
    # Log metrics every N optimizer steps / iterations.
    log_every: int = _num(1, 1, BIG)
    # Write plots.png (and PPO's held-out plots) at the end.
    plot: bool = True
    # Experiment trackers that also get the metrics (tensorboard, wandb); none by default, and
    # neither is a dependency of align: install the one you name.
    report_to: list[str] = field(default_factory=list)


@dataclass
class DPOTrainConfig:
    # DPO's beta: the strength of the pull towards the reference (the implicit reward is beta *
    # log(pi/ref)).
    beta: float = _num(0.1, 0, 100, lo_open=True)
    # LoRA's best LR is ~10x full fine-tuning's (LoRA Without Regret). Measured on this CPU
    # (SmolLM2-135M, r=8): 5e-5 left the loss at 0.693 for 75 steps; 5e-4 moved it.
    learning_rate: float = _lr(5e-4)
    # Pairs per optimizer step and process.
    batch_size: int = _num(8, 1, 65536)
    # Micro-batches accumulated per optimizer step (the step sees batch_size x grad_accum
    # pairs).
    grad_accum: int = _num(1, 1, 65536)
    # Passes over the training pairs.
    epochs: int = _num(1, 1, 1000)
    max_steps: int = _num(0, 0, BIG)  # 0 = as many as epochs give
    # Share of the steps over which the learning rate rises linearly from 0 (then linear decay
    # to 0).
    warmup_ratio: float = _num(0.05, 0.0, 1.0)
    # AdamW's decoupled weight decay on the LoRA weights.
    weight_decay: float = _num(0.0, 0.0, 10.0)
    # Gradients are clipped to this global norm.
    max_grad_norm: float = _num(1.0, 0, 1e4, lo_open=True)
    # Truncation: the prompt keeps its *last* tokens (latest turns), answers their first. Sized
    # for a 2-core CPU: 128/64 packs 163k tokens for 1,000 HH pairs (192/96: 214k; none: 349k),
    # and compute is ~linear in tokens.
    max_length: int = _num(128, 2, MAX_TOKENS)
    # Tokens of the prompt kept (its last ones), within max_length.
    max_prompt_length: int = _num(64, 1, MAX_TOKENS)
    # TRL's DPO loss (sigmoid = the DPO paper's; ipo, hinge, robust, ... all 15 of TRL 1.16), or
    # a list of them summed with loss_weights (e.g. [sigmoid, sft]: RPO's DPO + NLL).
    loss_type: str | list[str] = _choice("sigmoid", "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard",
                                         "nca_pair", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                                         "exo_pair", "sft", "sigmoid_norm")
    # One weight per loss of a loss_type list (empty = 1 each).
    loss_weights: list[float] = field(default_factory=list)
    # Conservative DPO / robust: the assumed share of flipped preference labels.
    label_smoothing: float = _num(0.0, 0.0, 0.5, hi_open=True)
    # The held-out (data.eval_subsets) pairs' length: -1 = truncated as in training, 0 =
    # untruncated (what a user's conversations are), N = N tokens (the prompt at most half).
    # Validation pairs are always truncated as in training.
    eval_max_length: int = _num(-1, -1, MAX_TOKENS)
    # What is optimised: dpo (TRL's DPO losses, train.loss_type, against the reference) or a
    # reference-free objective on the policy's own per-token log-probs (no reference pass at all):
    # simpo (beta-scaled margin of average log-probs above simpo_gamma_ratio x beta; SimPO's beta
    # is ~2) or orpo (the chosen answer's NLL + beta x log-sigmoid of the log odds ratio; ORPO's
    # lambda, ~0.1). align/dpo/objectives.py.
    # kto: unpaired -- each pair's two answers become a thumbs-up and a thumbs-down row (TRL's
    # prompt/completion/label format), each moved against the policy's KL to the reference.
    objective: str = _choice("dpo", "dpo", "simpo", "orpo", "kto")
    # Reference scores kept across runs, keyed by the base's weights, the pairs' tokens, the
    # batching, the versions and the machine (align/dpo/reference_store.py): a run with the same
    # key (a beta or loss sweep, a rerun) reads them instead of scoring again. auto =
    # $ALIGN_CACHE_DIR/reference-scores (default ~/.cache/align), off, or a folder.
    reference_cache: str = "auto"
    # SimPO's target margin over beta (gamma / beta).
    simpo_gamma_ratio: float = _num(0.5, 0.0, 100.0)
    # KTO's weight of thumbs-up rows (the paper: keep w_D n_D / (w_U n_U) in [1, 4/3]).
    kto_desirable_weight: float = _num(1.0, 0.0, 100.0, lo_open=True)
    # KTO's weight of thumbs-down rows.
    kto_undesirable_weight: float = _num(1.0, 0.0, 100.0, lo_open=True)


@dataclass
class EvalConfig:
    # At the end of the job, `align eval --generate` of the trained adapter against the base:
    # held-out prompts answered by both, judged, side by side in <run>/eval-report/report.html.
    generate: bool = False
    prompts: str = ""                 # a prompt dataset ("" = the job's own held-out data)
    prompt_subsets: list[str] = field(default_factory=list)  # "" = the job's held-out subsets
    # Held-out prompts answered by both the adapter and the base.
    num_prompts: int = _num(64, 1, BIG)
    # Tokens generated per answer in that comparison.
    max_new_tokens: int = _num(64, 1, 65536)
    judge: str = ""                   # classifier:PATH | dpo:PATH | function:FILE.py:FN (required)


@dataclass
class DPOJobConfig:
    """`align dpo`: TRL DPO of a LoRA policy against the same base with adapters off."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # half-b of helpful-rejection-sampled: `align rm` trains on half-a, so each can judge a PPO
    # policy the other rewarded (configs/ppo_hh_rlhf.yaml)
    data: DataConfig = field(default_factory=lambda: DataConfig(train_rows="half-b"))
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(save_every=25))
    # Evaluate on the held-out subsets at the end of training.
    evaluate: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class PromptDataConfig:
    # A local JSONL/Parquet file or folder, a Hub id, or the mirror's `imdb-reviews` /
    # `Anthropic/hh-rlhf` (HH rows give their prompts). No default: name your prompts, or run
    # the demo's config (configs/ppo_imdb_sentiment.yaml).
    dataset: str = ""
    # The row field holding the prompt: a string or a list of chat messages.
    text_field: str = "prompt"
    # Keep only the first N words of the field (0 = all), e.g. IMDB openings as prompts.
    first_words: int = _num(0, 0, BIG)
    # Wrapped in the chat template as one user turn; {text} is the field's text (the only field).
    template: str = "{text}"
    # HH-RLHF (or a folder of files): the subsets/files prompts are read from ([] = all).
    subsets: list[str] = field(default_factory=list)
    # HH-RLHF: held-out prompts from these subsets instead of from `subsets` (never trained on).
    eval_subsets: list[str] = field(default_factory=list)
    # Rows [start:stop) of the source (0 = to the end): keep prompts apart from data a reward
    # model was fitted on.
    rows_start: int = _num(0, 0, HUGE)
    # End of that row range (exclusive; 0 = to the end).
    rows_stop: int = _num(0, 0, HUGE)
    # The first `eval_prompts` of those rows (after a seeded shuffle) are held out -- or, with
    # eval_dataset, the first `eval_prompts` of that (0 = all of it).
    eval_prompts: int = _num(64, 0, BIG)
    # Held-out prompts from their own file/folder/Hub id (the same format; a training prompt with
    # the same text is dropped from training). The built-in `arithmetic` task holds out its fixed
    # 400-problem file (align/data/arithmetic_heldout.jsonl) unless this names another.
    eval_dataset: str = ""
    # The row field holding the reference answer (the reward gets every field anyway): held-out
    # prompts that carry it are graded for accuracy at each evaluation ("" = no accuracy).
    answer_field: str = "answer"
    # The row field naming each problem's difficulty/kind: accuracy is also reported per value.
    difficulty_field: str = "difficulty"
    # Seed of the prompts' shuffle (which are held out, in which order they are used).
    seed: int = _num(0, 0, SEED_MAX)


@dataclass
class RolloutConfig:
    # An engine of align/rollout/__init__.py: hf | vllm (in-process, one engine per trainer
    # process) | vllm-server (a `vllm serve` process that align starts, on
    # rollout.server_devices: trainer and generator apart). The names are declared here (config
    # imports no other part of align); tests/test_structure.py keeps them equal to ENGINES.
    engine: str = _choice("hf", "hf", "vllm", "vllm-server")
    server_devices: str = ""  # CUDA_VISIBLE_DEVICES of the vllm-server process ("" = inherit)
    # vllm-server: where it listens. Loopback by default; another host exposes the server's
    # runtime adapter loading, so it always requires an API key (server_api_key, or a random
    # one per run when empty).
    server_host: str = "127.0.0.1"
    # Put it in the config file (or leave it empty), not on the command line, where every local
    # user can read it (`ps`). Never written out: config.yaml and printed configs show <redacted>.
    server_api_key: str = field(default="", metadata={"secret": True})
    # Prompts longer than this keep their *last* tokens (the latest turns); the count is
    # reported. The engine's context is max_prompt_tokens + max_new_tokens.
    max_prompt_tokens: int = _num(512, 1, MAX_TOKENS)
    # Tokens sampled per answer at most; an answer cut here without an end-of-turn is truncated
    # (see reward.truncation_penalty).
    max_new_tokens: int = _num(24, 1, 65536)
    # Sampling temperature of rollouts (and of pass@k at evaluation); held-out greedy answers
    # use 0.
    temperature: float = _num(1.0, 0, 10.0, lo_open=True)
    # Nucleus sampling: sample from the smallest set of tokens holding this much probability (1
    # = all).
    top_p: float = _num(1.0, 0.0, 1.0, lo_open=True)
    # vLLM on a GPU: the share of the GPU's memory the engine takes (weights, KV cache, CUDA
    # graphs) beside the trainer, which keeps the rest. Ignored on a CPU
    # (VLLM_CPU_KVCACHE_SPACE sizes the CPU engine's cache).
    gpu_memory_fraction: float = _num(0.3, 0.0, 1.0, lo_open=True, hi_open=True)
    # vLLM adapter sync: lora (swap in a new LoRARequest) | merged | auto
    sync: str = _choice("lora", "lora", "merged", "auto")
    # Greedy-decode this many prompts in engine and trainer after each sync (0 = off).
    parity_prompts: int = _num(2, 0, 1000)
    # Run that check every N syncs (0 = never).
    parity_every: int = _num(1, 0, BIG)


@dataclass
class RewardConfig:
    # function: a Python function (`reward.function`); classifier: an `align rm` reward model;
    # dpo: a DPO adapter's implicit reward beta * (log pi - log pi_ref) of the answer. Adapters
    # go onto the policy's own base (no second copy) and see the whole conversation.
    kind: str = _choice("function", "function", "classifier", "dpo")
    # `path/to/file.py:function` or `package.module:function` (kind function).
    function: str = "reward.sentiment:positive_sentiment"
    # A run folder or adapter folder (kinds classifier and dpo), trained on the policy's base.
    adapter: str = ""
    # kind dpo: beta of the implicit reward (0 = the DPO run's train.beta, else 0.1).
    beta: float = _num(0.0, 0.0, 100.0)
    # More terms added to the score, each `kind:source` as for `align eval --judge`
    # (classifier:RUN, dpo:RUN, function:FILE.py:FN), e.g. [classifier:runs/rm-b]: preference
    # models that err differently average out some of each other's errors. Each term is
    # multiplied by its entry of also_weights (empty = 1 each).
    also: list[str] = field(default_factory=list)
    # One weight per `also` term (empty = 1 each).
    also_weights: list[float] = field(default_factory=list)
    # Added to the score of answers cut at max_new_tokens without an EOS (0 = no penalty).
    truncation_penalty: float = _num(0.0, -1e6, 1e6)
    # A reward call that takes longer stops the run with an error naming the function.
    timeout_seconds: float = _num(300.0, 0, 86400.0, lo_open=True)
    # How the function receives `completions` (and `prompts`): text (strings) or messages --
    # TRL's conversational form, [{"role": "assistant", "content": ...}] per completion and the
    # message list per prompt, for TRL reward functions such as trl.rewards.accuracy_reward.
    completions: str = _choice("text", "text", "messages")


@dataclass
class JudgeConfig:
    # A second reward the policy never trains against, to check what it learned: at every
    # held-out evaluation it scores the answers, and at the end policy vs base answers give a
    # win rate with a 95% CI. none | function | classifier | dpo, as for `reward`.
    kind: str = _choice("none", "none", "function", "classifier", "dpo")
    # `path/to/file.py:function` or `package.module:function` (kind function).
    function: str = ""
    # A run folder or adapter folder (kinds classifier and dpo), trained on the policy's base.
    adapter: str = ""
    # kind dpo: beta of the implicit reward (0 = the DPO run's train.beta, else 0.1).
    beta: float = _num(0.0, 0.0, 100.0)
    # A judge call that takes longer stops the run with an error naming the function.
    timeout_seconds: float = _num(300.0, 0, 86400.0, lo_open=True)


@dataclass
class PPOTrainConfig:
    # Iterations (sample, score, update) at most; time_budget_minutes may stop earlier.
    iterations: int = _num(40, 1, BIG)
    # Prompts sampled per iteration (all processes together).
    prompts_per_iteration: int = _num(16, 1, 65536)
    # Answers sampled per prompt (k; grpo/rloo need >= 2: the group's baseline).
    samples_per_prompt: int = _num(2, 1, 1024)
    # An estimator of align/ppo/advantages.py: gae (actor-critic, a LoRA critic + value head),
    # grpo / rloo (critic-free group baselines, samples_per_prompt >= 2).
    advantage: str = "gae"
    # The policy adapter's learning rate (LoRA's best is ~10x full fine-tuning's).
    learning_rate: float = _lr(5e-4)
    # gae: the critic's learning rate (its adapter and value head).
    value_learning_rate: float = _lr(5e-4)
    # Passes over each iteration's answers (1 = on-policy: the ratio is 1 at the first step).
    ppo_epochs: int = _num(2, 1, 100)
    # Answers per optimizer step (all processes together).
    minibatch_size: int = _num(16, 1, BIG)
    # 0 = each minibatch in one pass; else gradients accumulated over chunks of this many answers
    # (the same update, a fraction of the activation memory)
    micro_batch_size: int = _num(0, 0, BIG)
    # PPO's ratio clip: the ratio is held within [1 - clip_range, 1 + clip_range(_high)].
    clip_range: float = _num(0.2, 0, 10.0, lo_open=True)
    # The ratio's upper clip 1 + clip_range_high (DAPO's "clip-higher": room for unlikely tokens
    # to gain); 0 = clip_range, symmetric.
    clip_range_high: float = _num(0.0, 0.0, 10.0)
    # gae: the value prediction may move this far from the old one before its loss is clipped.
    value_clip_range: float = _num(0.2, 0, 1e4, lo_open=True)
    # gae: weight of the value loss (beside the policy loss with critic=shared; with separate it
    # scales the critic's own gradient).
    vf_coef: float = _num(0.5, 0.0, 100.0)
    # Entropy bonus: minus this times the token-mean entropy is added to the loss.
    entropy_coef: float = _num(0.0, 0.0, 10.0)
    # gae: discount per token (1 = none: an answer's reward is its last token's).
    gamma: float = _num(1.0, 0.0, 1.0)
    # gae: lambda, trading the critic's bias (0) for the return's variance (1).
    lam: float = _num(0.95, 0.0, 1.0)
    # KL(policy || reference) penalty per token; adaptive control when kl_target > 0.
    kl_coef: float = _num(0.05, 0.0, 100.0)
    # reward: -kl_coef * KL is folded into each answer's score before its advantage (RLHF's
    # classic; the sampled KL adds noise to the advantages). loss: the score alone makes the
    # advantage and kl_coef * token-mean KL is added to the policy's loss, its gradient taken
    # directly (GRPO's; kl_coef is then in units of the normalised advantages, not the reward's).
    kl_penalty: str = _choice("reward", "reward", "loss")
    # k1 = log(pi/ref); k2 = k1^2 / 2 (its gradient is KL's, on-policy); k3 = (r - 1) - log r.
    kl_estimator: str = _choice("k1", "k1", "k2", "k3")
    # Adaptive KL control (Ziegler et al.): kl_coef is steered so the KL per answer approaches
    # this (0 = a fixed kl_coef).
    kl_target: float = _num(0.0, 0.0, 1e4)
    # Adaptive KL control's horizon in answers: how fast kl_coef moves.
    kl_horizon: int = _num(10000, 1, HUGE)
    # Normalise each batch's advantages to mean 0, std 1.
    whiten_advantages: bool = True
    # grpo/rloo: what a group-centred score is divided by -- group (its group's std, GRPO), batch
    # (the std of the batch's scores), none (Dr. GRPO: no division); auto = group for grpo, none
    # for rloo. Dr. GRPO also sets whiten_advantages=false and loss_aggregation=seq-mean-token-sum.
    scale_rewards: str = _choice("auto", "auto", "group", "batch", "none")
    # How per-token losses become one number: token-mean (every token of the minibatch weighs
    # the same), seq-mean-token-sum (each answer's token sum, averaged over answers),
    # seq-mean-token-mean (each answer's token mean, averaged: every answer weighs the same).
    loss_aggregation: str = _choice("token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
    # grpo/rloo: leave out of the update the groups whose reward scores are all equal (no reward
    # signal; DAPO's dynamic-sampling filter). The count is logged per iteration (groups_skipped).
    skip_equal_reward_groups: bool = False
    # Answers cut at rollout.max_new_tokens without an end-of-turn get no weight in the loss
    # (DAPO's overlong filtering; TRL's mask_truncated_completions). They still count in their
    # group's baseline.
    mask_truncated_completions: bool = False
    # gae's critic: separate (its own LoRA adapter: one more pass each for scoring and update)
    # or shared (a value head on the policy's hidden states, trained through the policy adapter).
    critic: str = _choice("separate", "separate", "shared")
    # The "old" log-probs of PPO's ratio: trainer (a policy pass over the batch) or engine (the
    # sampler's own log-probs of its tokens, the same model, so a pass saved; the parity guard
    # checks the engine serves the trained policy). Critic-free estimators only.
    old_logprobs: str = _choice("trainer", "trainer", "engine")
    # Score the k answers of a prompt in one packed row (the prompt computed once), where that
    # is exact for the model (align/scoring/packing.py); false: one row per answer.
    pack: bool = True
    # Gradients are clipped to this global norm.
    max_grad_norm: float = _num(1.0, 0, 1e4, lo_open=True)
    # Stop this batch's epochs once approx-KL(old||new) exceeds this (0 = never).
    target_approx_kl: float = _num(0.1, 0.0, 100.0)
    # Evaluate on the held-out prompts every N iterations (0 = first and last only).
    eval_every: int = _num(5, 0, BIG)
    # Each held-out evaluation samples one answer per prompt for the reward, the judge and the KL
    # to the reference. false: with graded prompts, greedy accuracy (and pass@k) only -- a quicker
    # yardstick (configs/smoke.yaml); the training samples' KL is still logged every iteration.
    eval_sampled: bool = True
    # false: no evaluation at iteration 0 -- the base's numbers, the same for every run of one
    # base and held-out set; a sweep (scripts/lora_without_regret.py) evaluates the base once.
    eval_at_start: bool = True
    # With held-out prompts that carry data.answer_field: besides greedy accuracy, pass@k from
    # k answers sampled per prompt at rollout.temperature (0 = greedy accuracy only).
    eval_pass_k: int = _num(0, 0, 1024)
    # Stop after the iteration that crosses this many minutes (0 = no budget), then evaluate.
    time_budget_minutes: float = _num(0.0, 0.0, 525600.0)  # up to a year
    # With several processes: ddp (every rank holds the whole base; the adapters' gradients are
    # averaged by torch's DistributedDataParallel) or fsdp2 (torch's fully_shard: each rank holds
    # 1/N of every decoder layer and of the embeddings, gathered layer by layer for each pass --
    # for a base too large for one device). auto: fsdp2 when launched with
    # configs/accelerate/fsdp.yaml (accelerate's FSDP setting), else ddp.
    parallelism: str = _choice("auto", "auto", "ddp", "fsdp2")


@dataclass
class PPOJobConfig:
    """`align ppo`: PPO with a custom reward; policy, reference and critic on one frozen base."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    ppo: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class RMTrainConfig:
    # The reward adapter's (and score head's) learning rate.
    learning_rate: float = _lr(5e-4)
    # Pairs per optimizer step and process.
    batch_size: int = _num(8, 1, 65536)
    # Passes over the training pairs.
    epochs: int = _num(1, 1, 1000)
    # Stop after this many optimizer steps (0 = as many as epochs give).
    max_steps: int = _num(0, 0, BIG)
    # Share of the steps over which the learning rate rises linearly from 0 (then linear decay
    # to 0).
    warmup_ratio: float = _num(0.05, 0.0, 1.0)
    # AdamW's decoupled weight decay on the trained weights.
    weight_decay: float = _num(0.0, 0.0, 10.0)
    # Gradients are clipped to this global norm.
    max_grad_norm: float = _num(1.0, 0, 1e4, lo_open=True)
    # Training truncation, as DPO's: the prompt keeps its last tokens, answers their first.
    # 192/96 fits 1,112 pairs into ~22 min on this CPU (256/128 measured 1,641 s per 1,000 pairs).
    max_length: int = _num(192, 2, MAX_TOKENS)
    # Tokens of the prompt kept (its last ones), within max_length.
    max_prompt_length: int = _num(96, 1, MAX_TOKENS)
    # Held-out evaluation length (0 = untruncated: what the model meets in PPO).
    eval_max_length: int = _num(0, 0, MAX_TOKENS)
    # Keeps scores near 0: + center_coef * (r_chosen + r_rejected)^2 (TRL's centering term).
    center_coef: float = _num(0.01, 0.0, 100.0)


@dataclass
class RMJobConfig:
    """`align rm`: a LoRA reward model (a sequence classifier trained by a transformers Trainer on packed pairs, Bradley-Terry loss) on preference pairs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(
        train_rows="half-a", validation_pairs=200, max_train_pairs=0))
    train: RMTrainConfig = field(default_factory=RMTrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(save_every=20))
    # Evaluate on the held-out subsets at the end of training.
    evaluate: bool = True


JOBS: dict[str, type] = {"dpo": DPOJobConfig, "ppo": PPOJobConfig, "rm": RMJobConfig}


# --------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# YAML as users write it
# --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML with two traps removed: a key given twice in one mapping is an error naming both
    lines (PyYAML keeps the last one silently: a second ``train:`` section dropped the first's
    keys), and only true/false are booleans (YAML 1.2): YAML 1.1 also reads on/off/yes/no as
    booleans, so ``resume: off`` arrived as False."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}: key '{key}' appears twice in one section "
                                  f"(lines {seen[key]} and {line}); keep one")
        except TypeError:  # an unhashable key: PyYAML's own error follows
            break
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, name: str = "<text>"):
    """Parse config YAML (see :class:`_Loader`); ``name`` is the file named in errors."""
    loader = _Loader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


_WORD_BOOLS = {"yes": True, "on": True, "y": True, "no": False, "off": False, "n": False}


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
    if tp is bool and isinstance(value, str) and value.lower() in _WORD_BOOLS:
        return _WORD_BOOLS[value.lower()]  # plot: off -- what YAML 1.1 users type
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
    if isinstance(data, _Override):  # `train={beta: 0.2}` on the command line
        data = data.parsed if isinstance(data.parsed, dict) else data.raw
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "<top>"
        first = dataclasses.fields(cls)[0].name
        raise ConfigError(f"{where}: '{section}' is a section of keys, not a value (got {data!r}); "
                          f"set its keys, e.g. {section}.{first}=...")
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
        value = load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ConfigError):
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
            data = load_yaml(_read_utf8(path), str(path)) or {}
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


def _bound_text(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return "must be " + " and ".join(parts) if parts else "must be a finite number"


def _or_list(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def check_declared(section, prefix: str = "") -> list[tuple[str, str]]:
    """(key, why) for every value outside its declared range or choices, recursively; floats
    must be finite everywhere."""
    problems = []
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += check_declared(value, f"{key}.")
            continue
        choices, bounds = f.metadata.get("choices"), f.metadata.get("range")
        if choices is not None and isinstance(value, list) and typing.get_origin(f.type) is None \
                and "list" in str(f.type):  # a list of choices (train.loss_type)
            for i, item in enumerate(value):
                if item not in choices:
                    problems.append((f"{key}[{i}]", f"must be {_or_list(choices)}, got {item!r}"))
            if not value:
                problems.append((key, "must name at least one choice"))
        elif choices is not None and value not in choices:
            problems.append((key, f"must be {_or_list(choices)}, got {value!r}"))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append((key, f"must be a finite number, got {value}"))
            continue
        if bounds is not None:
            lo, hi, lo_open, hi_open = bounds
            if (lo is not None and (value <= lo if lo_open else value < lo)) or \
                    (hi is not None and (value >= hi if hi_open else value > hi)):
                problems.append((key, f"{_bound_text(*bounds)}, got {value}"))
    return problems


_RUN_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


def validate(cfg, where: str = "config") -> None:
    """Declared ranges and choices of every key, then the checks that tie keys together; each
    error names the key."""

    def bad(key: str, why: str):
        raise ConfigError(f"{where}: key '{key}' {why}")

    for key, why in check_declared(cfg):
        bad(key, why)
    train = getattr(cfg, "train", None)
    if isinstance(train, (DPOTrainConfig, RMTrainConfig)) and train.max_prompt_length >= train.max_length:
        bad("train.max_prompt_length", "must be smaller than train.max_length")
    if isinstance(train, DPOTrainConfig) and "exo_pair" in (train.loss_type if isinstance(train.loss_type, list)
                                                           else [train.loss_type]) and not train.label_smoothing > 0:
        bad("train.label_smoothing", "must be > 0 with the exo_pair loss (TRL refuses 0; the EXO paper uses 1e-3)")
    if isinstance(train, DPOTrainConfig) and train.loss_weights:
        n = len(train.loss_type) if isinstance(train.loss_type, list) else 1
        if len(train.loss_weights) != n:
            bad("train.loss_weights", f"needs one weight per loss of train.loss_type ({n}), got {len(train.loss_weights)}")
        if not all(math.isfinite(w) and w >= 0 for w in train.loss_weights):
            bad("train.loss_weights", f"must be finite and >= 0, got {train.loss_weights}")
    name = cfg.run.name
    if name and (name in (".", "..") or not _RUN_NAME.fullmatch(name)):
        bad("run.name", f"must be one folder name of letters, digits and - _ . @ (not . or ..; a "
            f"path goes in run.output_dir), got {name!r}")
    for tracker in cfg.run.report_to:
        if tracker not in ("tensorboard", "wandb"):
            bad("run.report_to", f"lists tensorboard and/or wandb, got {tracker!r}")
    ppo = getattr(cfg, "ppo", None)
    lora = getattr(cfg, "lora", None)
    if lora is not None and isinstance(lora.r, str) and lora.r != "full":
        bad("lora.r", f"must be a rank (an integer > 0) or full, got {lora.r!r}")
    if lora is not None and lora.r == "full" and ppo is None:
        bad("lora.r", "is full (full fine-tuning), a mode of align ppo only; DPO and reward models train "
            "an adapter: give a rank, e.g. lora.r=8")
    if ppo is not None and lora.r == "full":
        _check_full_finetuning(cfg, bad)
    if ppo is not None:
        batch = ppo.prompts_per_iteration * ppo.samples_per_prompt
        if batch % ppo.minibatch_size:
            bad("ppo.minibatch_size", f"must divide the batch of prompts_per_iteration x "
                f"samples_per_prompt = {batch}, got {ppo.minibatch_size}")
        rw = cfg.reward
        for i, spec in enumerate(rw.also):
            if spec.partition(":")[0] not in ("classifier", "dpo", "function") or not spec.partition(":")[2]:
                bad(f"reward.also[{i}]", f"must be classifier:PATH, dpo:PATH or function:FILE.py:FN, got {spec!r}")
        if rw.also_weights and len(rw.also_weights) != len(rw.also):
            bad("reward.also_weights", f"must give one weight per reward.also term ({len(rw.also)}), "
                f"got {len(rw.also_weights)}")
        if not all(math.isfinite(w) and abs(w) <= 1000 for w in rw.also_weights):
            bad("reward.also_weights", f"must be finite numbers within [-1000, 1000], got {rw.also_weights}")
        used = [rw.adapter] * (rw.kind != "function") + \
            [t.partition(":")[2] for t in rw.also if not t.startswith("function:")]
        if cfg.judge.kind in ("classifier", "dpo") and any(
                Path(u).resolve() == Path(cfg.judge.adapter).resolve() for u in used if u):
            bad("judge.adapter", f"is a term of the reward ({cfg.judge.adapter}): the judge must be a "
                "preference model the policy never trains against")
        if ppo.kl_penalty == "loss" and ppo.kl_estimator == "k1":
            bad("ppo.kl_estimator", "must be k2 or k3 with ppo.kl_penalty=loss (the gradient of k1 "
                "is zero in expectation: it would not pull towards the reference), got k1")
        micro = ppo.micro_batch_size
        if micro and (ppo.minibatch_size % micro or micro % ppo.samples_per_prompt):
            bad("ppo.micro_batch_size", f"must divide ppo.minibatch_size ({ppo.minibatch_size}) and be a "
                f"multiple of ppo.samples_per_prompt ({ppo.samples_per_prompt}), got {micro}")
    data = getattr(cfg, "data", None)
    if isinstance(data, PromptDataConfig):
        _check_template(data.template, bad)
    ev = getattr(cfg, "eval", None)
    if ev is not None and ev.generate and not ev.judge:
        bad("eval.judge", "must name a judge when eval.generate is true (classifier:PATH, dpo:PATH or function:SPEC)")


def _check_full_finetuning(cfg, bad) -> None:
    """What ``lora.r: full`` cannot do: every role but the policy and its frozen reference is an
    adapter on the base, and an adapter needs a base that does not move."""
    if cfg.ppo.advantage == "gae":
        bad("ppo.advantage", "must be grpo or rloo with lora.r=full (a critic is an adapter on the "
            "base, and full fine-tuning moves the base), got gae")
    if cfg.reward.kind != "function" or any(not t.startswith("function:") for t in cfg.reward.also):
        bad("reward.kind", "must be function (a Python reward) with lora.r=full: reward models are "
            "adapters on the base, and full fine-tuning moves the base")
    if cfg.judge.kind in ("classifier", "dpo"):
        bad("judge.kind", "must be none or function with lora.r=full (an adapter judge sits on the base, "
            "which full fine-tuning moves)")
    if cfg.rollout.engine != "hf":
        bad("rollout.engine", f"must be hf with lora.r=full (the vLLM engines sync LoRA adapters or "
            f"merged LoRA weights; a full model's sync is not built), got {cfg.rollout.engine}")


def _check_template(template: str, bad) -> None:
    """``{text}`` must be there (or every prompt is the same text) and be the only field."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        bad("data.template", f"is not a valid template ({e}); write literal braces as {{{{ }}}}")
    others = sorted({f for f in fields if f != "text"})
    if others:
        bad("data.template", f"may use only the field {{text}}, got {{{others[0]}}}")
    if "text" not in fields:
        bad("data.template", f"must contain {{text}} (where the prompt goes), got {template!r}")


REDACTED = "<redacted>"


def to_dict(cfg) -> dict:
    """The config as plain data, secrets (fields marked ``secret``) replaced by ``<redacted>``:
    this is what is written (config.yaml, trackers) and printed. Code reads secrets from ``cfg``."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif f.metadata.get("secret") and value:
            out[f.name] = REDACTED
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------
# Every key explained: `align config JOB --explain`
# --------------------------------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """{field: its explanation} for one config dataclass, read from the comments written above
    (or beside) each field in this file -- the one place a key is documented, so the printed
    explanation cannot drift from the code. A field typed as another section is explained by
    that section's docstring (or the comments above it)."""
    import inspect

    lines = inspect.getsource(cls).splitlines()
    docs, pending = {}, []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("#").strip())
            continue
        m = re.match(r"(\w+)\s*:", text)
        if m and not text.startswith(("def ", "class ", '"""')):
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            docs[m.group(1)] = " ".join(pending + ([trailing] if trailing else [])).strip()
        pending = []
    return docs


def _range_text(f) -> str:
    choices, bounds = f.metadata.get("choices"), f.metadata.get("range")
    if choices is not None:
        return "one of " + ", ".join(str(c) for c in choices)
    if bounds is not None:
        return _bound_text(*bounds).replace("must be ", "")
    return ""


def explain(cfg, prefix: str = "") -> list[tuple[str, Any, str, str]]:
    """(dotted key, value, meaning, accepted range) for every key of a resolved config."""
    out = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += explain(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value, docs.get(f.name, ""), _range_text(f)))
    return out


def dump_explained(cfg) -> str:
    """The resolved config as YAML with each key's meaning and range as comments above it."""
    import textwrap

    rows = {key: (doc, rng) for key, _, doc, rng in explain(cfg)}
    out, section = [], None
    for line in dump_yaml(cfg).splitlines():
        m = re.match(r"(\s*)([\w-]+):", line)
        if m and not m.group(1):
            section = m.group(2)
        key = f"{section}.{m.group(2)}" if m and m.group(1) else (m.group(2) if m else None)
        if key in rows:
            doc, rng = rows[key]
            text = doc + (f" [{rng}]" if rng else "")
            indent = m.group(1)
            out += textwrap.wrap(text, 96, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        out.append(line)
    return "\n".join(out) + "\n"
