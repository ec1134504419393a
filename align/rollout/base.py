"""The one interface PPO (and sampling/evaluation) uses to get completions."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class SamplingConfig:
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    greedy: bool = False
    # One seed per prompt: each row's sample then depends only on its seed, not on the batch it
    # shares or the process it runs in (PPO: N data-parallel ranks sample what one would).
    row_seeds: list[int] | None = None
    # Return the model's log-probs of the sampled tokens (raw, before temperature/top-p). vLLM
    # always does; the hf engine records them step by step (one step's log-softmax kept).
    logprobs: bool = False

    def __post_init__(self):
        if self.temperature == 0:  # rollout.temperature=0 means greedy decoding
            self.greedy = True


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]           # generated tokens, EOS included when the model stopped
    finished: bool                 # ended with EOS (False = cut at max_new_tokens)
    logprobs: list[float] | None = None  # sampler's log-probs of token_ids, when the engine gives them
    text: str = ""


@dataclass
class EngineStats:
    generated_tokens: int = 0
    seconds: float = 0.0
    syncs: int = 0
    sync_seconds: list[float] = field(default_factory=list)


@dataclass
class EngineOptions:
    """What an engine needs from a job, and nothing else (no job config reaches rollout/)."""

    base_path: str                  # a local folder (the mirror's) or a Hub id to load
    base_name: str = ""             # the base as users know it, written into adapter configs
    dtype: str = "auto"             # the trainer's dtype (align.placement): the engine computes what it does
    device: str = "auto"            # the trainer's device: an in-process engine shares it
    memory_fraction: float | None = None  # vLLM's GPU share beside the trainer (None: placement's default)
    max_lora_rank: int = 8
    seed: int = 0
    sync: str = "lora"              # vLLM: lora | merged | auto
    max_model_len: int = 1024       # longest prompt + answer the engine must hold
    server_devices: str = ""        # vllm-server: CUDA_VISIBLE_DEVICES of the server process
    host: str = "127.0.0.1"         # vllm-server: where it listens
    api_key: str = ""               # vllm-server: required key ("" = a random one per start)
    log_dir: str | None = None      # where a server engine writes its log

    def __post_init__(self):
        self.base_name = self.base_name or self.base_path


class RolloutEngine(ABC):
    """``generate`` completions from the *current* policy; ``sync`` after each update.

    ``shares_trainer_weights``: the engine samples from the trainer's own model object, so it can
    never serve a stale policy and the parity guard has nothing to check."""

    name = "base"
    shares_trainer_weights = False
    dtype_name: str | None = None  # what the engine computes in, where it may differ from the trainer's

    @classmethod
    @abstractmethod
    def build(cls, opts: EngineOptions, peft_model, tokenizer) -> "RolloutEngine":
        """An engine serving ``peft_model``'s current policy (version 0)."""

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[Completion]:
        """Sample (or greedy-decode) one completion per prompt."""

    @abstractmethod
    def sync(self, peft_model, version: int) -> None:
        """Make policy ``version`` the one ``generate`` samples from."""

    def close(self) -> None:
        pass
