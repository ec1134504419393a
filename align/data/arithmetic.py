"""A built-in verifiable task: arithmetic problems with their answers, generated offline.

``data.dataset: arithmetic`` trains on seeded problems of graded difficulty; the held-out set
is a *fixed file* (:data:`HELDOUT_FILE`, committed, written once by ``python -m
align.data.arithmetic``), so every run -- and every result that cites it -- is judged on the same
400 problems: 100 each of one-digit +, one-digit x, two-digit +, two-digit -. Studies that
compare many runs use a superset of it, :data:`HELDOUT_1000_FILE` (``arithmetic-heldout-1000``).
Choices such as a learning rate are tuned on a *validation* set, :data:`VALIDATION_FILE`
(``arithmetic-validation``): two-digit problems in none of the held-out files.

The one-digit + and x spaces hold 100 problems each (operands 0-9), all of them held out, so
the training problems never contain them: a gain there is transfer from the harder problems
trained on. No held-out problem appears in training (compared after normalising the text).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

PROMPT = "What is {a} {op} {b}? Answer with the number only."
HELDOUT_FILE = Path(__file__).with_name("arithmetic_heldout.jsonl")
HELDOUT_PER_KIND = 100
# A larger fixed set for studies that compare many runs (scripts/lora_without_regret.py): the 400
# above plus 300 more of each two-digit kind -- 1,000 problems, paired across runs.
HELDOUT_1000_FILE = Path(__file__).with_name("arithmetic_heldout_1000.jsonl")
HELDOUT_1000_EXTRA = {"2-digit +": 300, "2-digit -": 300}
# Tuning data (scripts/bench_rl.py's learning-rate sweeps): two-digit problems -- the only held-out
# kinds with problems to spare (the one-digit spaces are all held out) -- in neither held-out file.
VALIDATION_FILE = Path(__file__).with_name("arithmetic_validation.jsonl")
VALIDATION_PER_KIND = {"2-digit +": 200, "2-digit -": 200}
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _one(n: int = 9):
    return range(0, n + 1)


def _two():
    return range(10, 100)


# kind -> (first operands, second operands, op); subtraction keeps a >= b (answers >= 0)
KINDS = {
    "1-digit +": (_one(), _one(), "+"),
    "1-digit *": (_one(), _one(), "*"),
    "1-digit -": (_one(), _one(), "-"),
    "2-digit +": (_two(), _two(), "+"),
    "2-digit -": (_two(), _two(), "-"),
    "1x2-digit *": (_one(), _two(), "*"),
    "1+2-digit +": (_one(), _two(), "+"),
}
HELDOUT_KINDS = ("1-digit +", "1-digit *", "2-digit +", "2-digit -")
TRAIN_KINDS = ("1-digit -", "2-digit +", "2-digit -", "1x2-digit *", "1+2-digit +")


def problem(a: int, op: str, b: int, kind: str) -> dict:
    """One prompt row: the question, its answer (a string, as a dataset would hold it), its kind."""
    return {"prompt": PROMPT.format(a=a, op=op, b=b), "answer": str(OPS[op](a, b)), "difficulty": kind}


def normalise(text: str) -> str:
    """What makes two problems the same problem: case and spacing do not."""
    return re.sub(r"\s+", " ", text.strip().lower())


def _all(kind: str) -> list[dict]:
    firsts, seconds, op = KINDS[kind]
    return [problem(a, op, b, kind) for a in firsts for b in seconds if op != "-" or a >= b]


def make_heldout(seed: int = 20261129) -> list[dict]:
    """HELDOUT_PER_KIND problems of each held-out kind (all of a kind's space when it is smaller)."""
    rng = random.Random(seed)
    out = []
    for kind in HELDOUT_KINDS:
        space = _all(kind)
        out += space if len(space) <= HELDOUT_PER_KIND else rng.sample(space, HELDOUT_PER_KIND)
    return out


def make_heldout_1000(seed: int = 20261130) -> list[dict]:
    """The fixed 400 (:data:`HELDOUT_FILE`) and :data:`HELDOUT_1000_EXTRA` more two-digit problems,
    none of them among the 400."""
    base = read_heldout()
    have = {normalise(r["prompt"]) for r in base}
    rng = random.Random(seed)
    out = list(base)
    for kind, n in HELDOUT_1000_EXTRA.items():
        out += rng.sample([r for r in _all(kind) if normalise(r["prompt"]) not in have], n)
    return out


def make_validation(seed: int = 20261201) -> list[dict]:
    """:data:`VALIDATION_PER_KIND` problems, none in either held-out file."""
    have = {normalise(r["prompt"]) for r in read_heldout(HELDOUT_1000_FILE)}
    rng = random.Random(seed)
    return [r for kind, n in VALIDATION_PER_KIND.items()
            for r in rng.sample([r for r in _all(kind) if normalise(r["prompt"]) not in have], n)]


def read_heldout(path: Path = HELDOUT_FILE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_train(n: int, seed: int = 0, heldout: list[dict] | None = None) -> list[dict]:
    """``n`` training problems, equal parts of each training kind (seeded), none of them a
    held-out problem; a kind with fewer problems than its share gives all it has, the others
    share the rest."""
    held = {normalise(r["prompt"]) for r in (read_heldout() if heldout is None else heldout)}
    rng = random.Random(seed)
    spaces = {k: [r for r in _all(k) if normalise(r["prompt"]) not in held] for k in TRAIN_KINDS}
    if n > sum(map(len, spaces.values())):
        raise ValueError(f"{n} training problems asked; the training kinds hold {sum(map(len, spaces.values()))}")
    out, kinds = [], sorted(TRAIN_KINDS, key=lambda k: len(spaces[k]))  # small kinds first: the rest fill up
    for i, kind in enumerate(kinds):
        share = -(-(n - len(out)) // (len(kinds) - i))
        out += rng.sample(spaces[kind], min(share, len(spaces[kind])))
    rng.shuffle(out)
    return out


if __name__ == "__main__":  # writes the fixed held-out and validation files once; refuses to change them
    for path, make in ((HELDOUT_FILE, make_heldout), (HELDOUT_1000_FILE, make_heldout_1000),
                       (VALIDATION_FILE, make_validation)):
        rows = make()
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if path.exists() and path.read_text() != text:
            raise SystemExit(f"{path} exists and differs: the held-out set is fixed; not overwriting it")
        path.write_text(text)
        print(f"{path}: {len(rows)} problems")
