"""Reference scores kept across runs (``train.reference_cache``).

A pair's reference log-probs are a pure function of the base's weights, the pair's tokens, how
the pairs are batched and the numerics that score them. A beta or loss sweep, a seed rerun or an
evaluation on the same held-out pairs pays the same reference passes again -- a third of a DPO
run on a CPU. This store keeps each split's scores under a key of everything that decides them,
so a second run with the same key reads them instead; anything else (another base or dtype, one
token, batch size, process count, library version, machine or align's scoring code) is a
different key and is computed afresh. An entry also keeps the seconds its computation took, so a
run that read it can still say what the pass costs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from .. import distributed

#: the sources whose change may change a score: they are part of every key
_SCORING_SOURCES = ("scoring/pairs.py", "scoring/logprobs.py", "scoring/packing.py", "scoring/batch.py",
                    "dpo/heldout.py", "models.py")


def store_folder(setting: str, key: str = "train.reference_cache") -> Path | None:
    """``train.reference_cache``: ``auto`` = ``$ALIGN_CACHE_DIR/reference-scores`` (default
    ``~/.cache/align``), ``off`` = no store, else that folder."""
    if setting == "off":
        return None
    if not setting.strip():
        from ..config import ConfigError

        raise ConfigError(f"{key} is empty: auto, off, or a folder")
    if setting == "auto":
        root = os.environ.get("ALIGN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "align")
        return Path(root) / "reference-scores"
    return Path(setting).expanduser()


def base_fingerprint(peft_model) -> str:
    """SHA-256 of the base's tensors (names, dtypes, shapes, bytes), adapters left out: two bases
    share scores only if every weight is the same. ~0.5 s for a 135M model on a CPU."""
    h = hashlib.sha256()
    seen = set()
    for name, t in sorted(peft_model.state_dict(keep_vars=False).items()):
        if "lora_" in name or (t.numel() and t.data_ptr() in seen):
            continue
        seen.add(t.data_ptr())
        t = distributed.full_tensor(t.detach())
        if t.is_meta:
            raise ValueError(f"reference_store.base_fingerprint: {name} is on the meta device (no values to key)")
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()))
    return h.hexdigest()


def _sources_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _SCORING_SOURCES:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()


def _tokens_digest(dataset) -> str:
    h = hashlib.sha256()
    for row in dataset:  # a datasets.Dataset or a list of rows
        h.update(json.dumps([row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]]).encode())
    return h.hexdigest()


def entry_key(peft_model, dataset, collator, batch_size: int) -> tuple[str, dict]:
    """The key of these pairs' reference scores, and what it was made of (kept in the entry)."""
    import peft
    import transformers

    from ..placement import placement_of
    from ..runs import machine_state

    where = placement_of(peft_model)
    machine = machine_state()
    parts = {
        "base": base_fingerprint(peft_model),
        "dtype": where.dtype, "device": str(where.device),
        "machine": machine.get("gpu") if where.device.type == "cuda" else machine.get("cpu"),
        "attention": getattr(peft_model.config, "_attn_implementation", None),
        "tokens": _tokens_digest(dataset), "pairs": len(dataset),
        "collator": [type(collator).__name__, {k: v for k, v in sorted(vars(collator).items())}],
        "batch_size": batch_size, "processes": distributed.world_size(), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "scoring_sources": _sources_digest(),
    }
    text = json.dumps(parts, sort_keys=True, default=str)  # plain values (torch's version is an object)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)


@dataclasses.dataclass
class Lookup:
    """What the store said of one split: ``hit`` (read, with the seconds the original pass took)
    or a miss (computed now, then ``saved`` unless the store could not be written)."""
    path: str
    hit: bool
    computed_seconds: float | None = None
    saved: bool = False
    note: str = ""


def read(folder: Path, key: str) -> tuple[dict | None, Lookup]:
    """The entry for ``key`` on rank 0, shared with every rank (a store on one machine's disk
    serves a run over several)."""
    path = folder / f"{key}.pt"
    found, note = None, ""
    if distributed.rank() == 0 and path.is_file():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("key") != key:
                raise ValueError("its key differs from its name")
            found = {"scores": {k: v.tolist() for k, v in entry["scores"].items()},
                     "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in entry["scores"].items()},
                     "seconds": entry["seconds"]}
        except Exception as e:  # noqa: BLE001 -- a damaged entry is recomputed, never trusted
            note = f"{path} could not be read ({type(e).__name__}: {e}); computing the scores again, the file left as it is"
            print(f"reference_cache: {note}")
    found, note = distributed.gather_objects((found, note))[0]  # rank 0's answer, on every rank
    if found is None:
        return None, Lookup(str(path), hit=False, note=note)
    scores = {k: torch.tensor(v, dtype=getattr(torch, found["dtypes"][k]), device="cpu")
              for k, v in found["scores"].items()}
    return scores, Lookup(str(path), hit=True, computed_seconds=found["seconds"])


def write(folder: Path, key: str, parts: dict, scores: dict, seconds: float, lookup: Lookup) -> None:
    """Keep a freshly computed entry (rank 0; atomic; a store that cannot be written is said and
    the run goes on: the scores are in hand). An entry already there is never replaced."""
    if distributed.rank() != 0:
        return
    path = Path(lookup.path)
    if path.exists():
        lookup.note = lookup.note or f"{path} exists: left as it is"
        return
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=".tmp")  # a name no one holds
        os.close(fd)
        tmp = Path(name)
        parts = json.loads(json.dumps(parts, default=str))  # an entry must load with weights_only
        torch.save({"key": key, "parts": parts, "scores": {k: v.detach().cpu() for k, v in scores.items()},
                    "seconds": round(seconds, 1), "created": time.strftime("%Y-%m-%d %H:%M:%S")}, tmp)
        os.link(tmp, path)  # fails if another run kept this key meanwhile: theirs stays
        lookup.saved = True
    except FileExistsError:
        lookup.note = f"{path} appeared while scoring: left as it is"
    except OSError as e:
        lookup.note = f"could not keep the scores in {folder} ({e}); the run goes on without the store"
        print(f"reference_cache: {lookup.note}")
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def scores_through(setting: str, model, dataset, collator, batch_size: int, compute) -> tuple[dict, dict, float]:
    """``compute()``'s reference scores (a dict of tensors), read from the store named by
    ``setting`` when an entry has this key, else computed and kept there. Returns the scores,
    what the store said (``{}`` when ``setting`` is ``off``) and the seconds spent here."""
    t = time.time()
    folder = store_folder(setting)
    if folder is None:
        return compute(), {}, time.time() - t
    key, parts = entry_key(model, dataset, collator, batch_size)
    found, lookup = read(folder, key)
    if found is None:
        found = compute()
        write(folder, key, parts, found, time.time() - t, lookup)
    return found, dataclasses.asdict(lookup), time.time() - t
