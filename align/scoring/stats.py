"""The statistics every job and `align eval` report, defined once: accuracy of margins with
ties counted 1/2, win rates with ties 1/2, normal 95 % intervals of a mean and of paired
differences, Wilson's interval of a proportion, and the judge-length correction."""
from __future__ import annotations

import math

import torch

Z95 = 1.959964  # the two-sided 95 % point of the normal distribution


def tie_half_accuracy(margin: torch.Tensor) -> float:
    """Share of margins > 0, a tie (== 0) counting 1/2: a model that scores both answers alike
    has not told them apart, so it earns what a coin would."""
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def mean_ci95(x: list[float]) -> tuple[float, float, float]:
    """Mean and a normal-approximation 95 % interval of the mean (sample sd; width 0 for n = 1)."""
    n = len(x)
    m = sum(x) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return m, m - half, m + half


def wins(a: list[float], b: list[float]) -> list[float]:
    """Per item: 1 where ``a`` scored above ``b``, 1/2 on a tie, 0 below."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def win_rate(a: list[float], b: list[float]) -> tuple[float, list[float]]:
    """How often ``a`` beats ``b`` on the same items (ties 1/2), with its 95 % interval."""
    m, lo, hi = mean_ci95(wins(a, b))
    return m, [lo, hi]


def wilson_ci95(hits: float, n: int) -> tuple[float, float]:
    """Wilson's 95 % interval of a proportion (sound near 0 and 1, where the normal one is not)."""
    if n == 0:
        return 0.0, 1.0
    z, p = Z95, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of b - a over the same items, with a normal 95 % interval of the paired differences
    (two models graded on the same problems: the per-item pairing removes the problems' spread)."""
    d = [y - x for x, y in zip(a, b)]
    mean, lo, hi = mean_ci95(d) if d else (0.0, 0.0, 0.0)
    return {"difference": mean, "ci95": [lo, hi], "n": len(d),
            "only_b_right": sum(v > 0 for v in d), "only_a_right": sum(v < 0 for v in d)}


def length_slope(lengths: list[float], scores: list[float]) -> float:
    """Least-squares slope of score on length: how much a judge pays per token of answer."""
    mx, my = sum(lengths) / len(lengths), sum(scores) / len(scores)
    var = sum((x - mx) ** 2 for x in lengths)
    return sum((x - mx) * (y - my) for x, y in zip(lengths, scores)) / var if var else 0.0
