"""Verifier rewards: 1.0 when an answer matches the row's reference answer, else 0.0, and None
("no score", TRL's convention: the sample is left out, never trained on) where the row has no
reference answer (``None``, an empty string, NaN).

Name one as the reward (``reward.function: reward.verify:numeric_match``); the reference comes
from the prompt row's ``answer`` field (or TRL's ``solution``), which align hands to the reward
as a keyword argument, one value per completion. Completions may be plain text or TRL's
conversational form (``[{"role": "assistant", "content": ...}]``).

- :func:`exact_match`: the whole answer, trimmed (and without a final period), equals the reference.
- :func:`numeric_match`: the *last* number in the answer equals the reference's number (thousands
  separators, signs and decimals read; ``12.0`` equals ``12``) -- the lenient grader.
- :func:`number_only_match`: the answer *is* one number (nothing else but an optional final
  period) and it equals the reference -- the strict grader of "answer with the number only".
- :func:`math_match`: math-verify's equivalence of LaTeX/expressions (``\\boxed{1/2}`` = ``0.5``).
- :func:`number_only`: a format term, 1.0 when the answer is one number, right or wrong
  (``reward.also: [function:reward.verify:number_only]`` with a weight).

Rewards run in align's worker thread, where math-verify's own SIGALRM timeouts cannot work:
they are turned off here, and ``reward.timeout_seconds`` bounds the call instead.
"""
from __future__ import annotations

import logging
import math
import re

# A number as people write it: sign, thousands separators (1,234 / 1 234 not), decimals.
_NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")
_ONLY_NUMBER = re.compile(r"^\s*\$?\s*([-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*\$?\s*\.?\s*$")


def _text(completion) -> str:
    """A completion's text: a string, or TRL's conversational list of messages (the last one)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _references(n: int, answer, solution) -> list:
    refs = answer if answer is not None else solution
    if refs is None:
        raise ValueError("verifier rewards need the reference answer: give each prompt row an "
                         "'answer' (or 'solution') field")
    if len(refs) != n:
        raise ValueError(f"{len(refs)} reference answers for {n} completions")
    return list(refs)


def missing(reference) -> bool:
    """A row without its answer: None, an empty or blank string, or NaN (a blank CSV/Parquet cell).
    Graded, such a row would turn "no label" into a score: 0 for any answer, or 1 for "None"."""
    if reference is None:
        return True
    if isinstance(reference, float) and math.isnan(reference):
        return True
    return isinstance(reference, str) and not reference.strip()


def _graded(grade, completions, refs) -> list[float | None]:
    return [None if missing(r) else float(grade(_text(c), r)) for c, r in zip(completions, refs)]


def to_number(text: str) -> float | None:
    """``"1,234"`` -> 1234.0, ``"-5"`` -> -5.0, ``"12.0"`` -> 12.0; None if it is not one number."""
    text = str(text).strip().replace("−", "-").replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (None if there is none)."""
    found = _NUMBER.findall(text)
    return to_number(found[-1]) if found else None


def only_number(text: str) -> float | None:
    """The number ``text`` consists of (an optional final period allowed), else None."""
    m = _ONLY_NUMBER.match(text)
    return to_number(m.group(1)) if m else None


def _same(value: float | None, reference, rel_tol: float = 1e-9, abs_tol: float = 1e-9) -> bool:
    ref = to_number(reference) if not isinstance(reference, (int, float)) else float(reference)
    if ref is None:
        ref = last_number(str(reference))
    return value is not None and ref is not None and math.isclose(value, ref, rel_tol=rel_tol, abs_tol=abs_tol)


def numeric_match(completions, answer=None, solution=None, **_) -> list[float | None]:
    """1.0 where the answer's last number equals the reference's (the lenient grader); None
    where the row has no reference."""
    refs = _references(len(completions), answer, solution)
    return _graded(lambda text, r: _same(last_number(text), r), completions, refs)


def number_only_match(completions, answer=None, solution=None, **_) -> list[float | None]:
    """1.0 where the answer is just one number and it equals the reference (the strict grader);
    None where the row has no reference."""
    refs = _references(len(completions), answer, solution)
    return _graded(lambda text, r: _same(only_number(text), r), completions, refs)


def exact_match(completions, answer=None, solution=None, **_) -> list[float | None]:
    """1.0 where the trimmed answer (a final period dropped) is the reference, character for
    character; None where the row has no reference."""
    refs = _references(len(completions), answer, solution)
    return _graded(lambda text, r: text.strip().removesuffix(".").strip() == str(r).strip(), completions, refs)


def number_only(completions, **_) -> list[float]:
    """Format term: 1.0 where the answer is one number (right or wrong)."""
    return [float(only_number(_text(c)) is not None) for c in completions]


def math_match(completions, answer=None, solution=None, **_) -> list[float | None]:
    """math-verify's verdict on each answer against its reference (LaTeX, ``\\boxed{}``, fractions,
    expressions). A missing reference, or one math-verify cannot parse, gives ``None`` ("no
    score"): the sample is left out of its group, as TRL does, instead of being marked wrong."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning, per call
    refs = _references(len(completions), answer, solution)
    out: list[float | None] = []
    for c, r in zip(completions, refs):
        if missing(r):
            out.append(None)
            continue
        gold = parse(str(r) if re.search(r"[$\\]", str(r)) else f"${r}$", parsing_timeout=None)
        if not gold:
            out.append(None)
            continue
        pred = parse(_text(c), parsing_timeout=None)
        out.append(float(bool(pred) and verify(gold, pred, timeout_seconds=None)))
    return out
