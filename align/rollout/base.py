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


class RolloutEngine(ABC):
    """``generate`` completions from the *current* policy; ``sync`` after each update."""

    name = "base"

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[Completion]:
        """Sample (or greedy-decode) one completion per prompt."""

    @abstractmethod
    def sync(self, peft_model, version: int) -> None:
        """Make policy ``version`` the one ``generate`` samples from."""

    def close(self) -> None:
        pass
