"""Small built-in rewards: useful on their own and as templates for your own function."""
from __future__ import annotations


def length_target(prompts, completions, target_words: int = 20, **info) -> list[float]:
    """1 at exactly ``target_words`` words, falling linearly to 0 at twice the distance."""
    return [max(0.0, 1.0 - abs(len(c.split()) - target_words) / target_words) for c in completions]


def ends_with_period(prompts, completions, **info) -> list[float]:
    """A format reward: 1 if the answer ends a sentence, else 0."""
    return [1.0 if c.strip().endswith((".", "!", "?")) else 0.0 for c in completions]
