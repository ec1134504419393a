"""Checkpoints and resume, one layout for every job (DPO, RM, PPO).

    <run>/checkpoints/step-N/      complete checkpoints only: each is written in a temp folder
                                   beside it and renamed into place in one step
    <run>/checkpoints/.tmp-*       a save in progress, or a crash's leftover: never picked,
                                   removed when the run resumes

Resuming (``run.resume``: ``off`` | ``auto`` | ``must``; ``--resume`` on the command line is
``must``) reuses the run folder, refuses a config that changed in a way that changes results,
drops the log lines written after the checkpoint (they will be written again), and hands the
job the checkpoint to load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

from .atomic import atomic_write_text, disk_refusals, follow_umask, replace_dir
from .config import ConfigError, to_dict
from .deps.transformers_internals import TrainerHooks
from .deps.trl_internals import TOTAL_TOKENS_ATTR

STEP_RE = re.compile(r"^step-(\d+)$")

# Keys that may differ between the interrupted run and its resumption: they do not change
# what the steps compute (or only how long the run goes on).
RESUME_MAY_CHANGE = {"run.resume", "run.save_every", "run.keep_last", "run.plot", "run.log_every",
                     "model.threads", "ppo.iterations", "ppo.time_budget_minutes",
                     "run.max_nonfinite_steps", "run.report_to", "reward.timeout_seconds",
                     "rollout.server_host", "rollout.server_api_key"}


def hf_warmup(ratio: float) -> float:
    """``warmup_steps`` for transformers' TrainingArguments that means ``ratio`` of the total
    steps for every ratio in [0, 1]: transformers reads a value below 1 as a ratio but 1.0 as
    *one step*. Just below 1, ceil(n * x) is still n for any n below 10^9 steps."""
    return ratio if ratio < 1 else 1 - 1e-9


def checkpoint_root(run_path: Path) -> Path:
    return Path(run_path) / "checkpoints"


def list_checkpoints(run_path: Path) -> dict[int, Path]:
    """Complete checkpoints by step (temp folders never match ``step-N``)."""
    root = checkpoint_root(run_path)
    if not root.is_dir():
        return {}
    found = {}
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir():
            found[int(m.group(1))] = d
    return dict(sorted(found.items()))


def latest_checkpoint(run_path: Path) -> Path | None:
    ckpts = list_checkpoints(run_path)
    return ckpts[max(ckpts)] if ckpts else None


def checkpoint_step(path: Path) -> int:
    return int(STEP_RE.match(Path(path).name).group(1))


def stage_dir(run_path: Path, step: int) -> Path:
    """A fresh temp folder to write checkpoint ``step`` into (see :func:`publish`)."""
    root = checkpoint_root(run_path)
    root.mkdir(parents=True, exist_ok=True)
    stage = root / f".tmp-step-{step}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def publish(stage: Path, run_path: Path, step: int, keep_last: int) -> Path:
    """Rename a fully written ``stage`` to ``step-N`` (one atomic rename), then keep the last K."""
    final = checkpoint_root(run_path) / f"step-{step}"
    follow_umask(stage)  # some writers (safetensors) make their files private
    _fsync_tree(stage)
    # the same step may be saved again (e.g. a signal right after a periodic save)
    replace_dir(stage, final)
    rotate(run_path, keep_last)
    return final


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rotate(run_path: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(run_path)
    steps = sorted(ckpts)
    for s in steps[: max(0, len(steps) - max(keep_last, 1))]:
        shutil.rmtree(ckpts[s], ignore_errors=True)


def remove_partial(run_path: Path) -> list[str]:
    """Delete temp folders a killed save left behind; returns their names."""
    root = checkpoint_root(run_path)
    gone = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
    return gone


# --------------------------------------------------------------------------------------
# align's own loops (PPO): the same layout, written by the job's ``write(folder)``
# --------------------------------------------------------------------------------------


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(d: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(d["torch"])
    random.setstate(d["python"])
    np.random.set_state(d["numpy"])
    if d.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])


def save_checkpoint(run_path: Path, step: int, keep_last: int, write) -> Path:
    """Checkpoint ``step`` of a loop align runs itself: rank 0 writes the job's files with
    ``write(folder)``, every rank its own RNG streams (``rng_state_<rank>.pt``), then the folder
    is published atomically and old ones rotated -- the layout the HF trainers' checkpoints
    (:class:`AtomicCheckpoints`) have too. Every rank must call it."""
    import torch

    from . import distributed

    rank = distributed.rank()
    tmp = stage_dir(run_path, step) if rank == 0 else checkpoint_root(run_path) / f".tmp-step-{step}"
    distributed.barrier()
    with refused_save(run_path, step, tmp):
        torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
    if rank != 0:
        distributed.barrier()
        distributed.barrier()
        return checkpoint_root(run_path) / f"step-{step}"
    with refused_save(run_path, step, tmp):
        write(tmp)
        distributed.barrier()  # every rank's RNG file is written
        final = publish(tmp, run_path, step, keep_last)
    distributed.barrier()
    return final


def resume_hint(run_path: Path) -> str:
    """How to go on from the last complete checkpoint of ``run_path``."""
    last = latest_checkpoint(run_path)
    try:  # the run's manifest (align.runs.MANIFEST; read here as a file: runs imports this module)
        job = json.loads((Path(run_path) / "run.json").read_text()).get("job", "<job>")
    except (OSError, ValueError):
        job = "<job>"
    if last is None:
        return "no checkpoint was completed; free space and start again"
    return (f"the last complete checkpoint is {last.name}: free space, then continue with "
            f"`align {job} <your config and overrides> run.output_dir={Path(run_path).parent} "
            f"run.name={Path(run_path).name} --resume`")


def refused_save(run_path: Path, step: int, staging: Path):
    """A checkpoint save the disk refuses: its partial folder removed, one line naming the step,
    the folder, the free space and the --resume command."""
    return disk_refusals(f"saving the checkpoint of step {step}", checkpoint_root(run_path), remove=staging,
                         then=f"the partial checkpoint was removed; {resume_hint(run_path)}")


def restore_rng(checkpoint: Path) -> None:
    """This rank's RNG streams as they were when ``checkpoint`` was written."""
    import torch

    from . import distributed

    rng = Path(checkpoint) / f"rng_state_{distributed.rank()}.pt"
    if not rng.is_file():
        raise ValueError(f"checkpoint '{checkpoint}' has no {rng.name}: it was written by a run with fewer "
                         "processes; resume with the same number of processes")
    set_rng_state(torch.load(rng, weights_only=False, map_location="cpu"))  # RNG states are host tensors


# --------------------------------------------------------------------------------------
# Choosing the run folder and checkpoint to resume
# --------------------------------------------------------------------------------------


def find_resume_folder(run_cfg, job: str) -> Path | None:
    """The folder a resumed run continues: ``run.name``'s, or the newest ``<job>-*`` run in
    ``run.output_dir`` that holds a checkpoint."""
    out = Path(run_cfg.output_dir)
    if run_cfg.name:
        return out / run_cfg.name
    candidates = [d for d in out.glob(f"{job}-*") if d.is_dir() and list_checkpoints(d)]
    return max(candidates, key=lambda d: d.stat().st_mtime) if candidates else None


def check_same_config(saved_yaml: Path, cfg) -> None:
    """A resumed run must compute what the interrupted one would have: refuse changed keys."""
    try:
        saved = yaml.safe_load(saved_yaml.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{saved_yaml}: cannot read the interrupted run's config: {e}") from e
    now = to_dict(cfg)
    diffs = [k for k in sorted(set(_flatten(saved)) | set(_flatten(now)))
             if _flatten(saved).get(k) != _flatten(now).get(k) and k not in RESUME_MAY_CHANGE]
    if diffs:
        shown = ", ".join(f"{k}: {_flatten(saved).get(k)!r} -> {_flatten(now).get(k)!r}" for k in diffs[:5])
        raise ConfigError(f"--resume: the config differs from the interrupted run's ({saved_yaml}) in "
                          f"{shown}; resume with the same config or start a new run.name")


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def truncate_jsonl(path: Path, max_step: int, key: str = "step") -> int:
    """Keep the records with ``key <= max_step`` (and drop a half-written last line); returns
    how many were dropped. Used on resume: steps after the checkpoint will be logged again."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec.get(key), int) and rec[key] > max_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


# --------------------------------------------------------------------------------------
# HF Trainer (DPO, RM): its checkpoints in this layout
# --------------------------------------------------------------------------------------


class AtomicCheckpoints(TrainerHooks):
    """Mixin for transformers Trainers (put it first). Their own ``checkpoint-N`` folder --
    adapter, optimizer, scheduler, RNG states of every rank, trainer state with the data
    position -- is written into a temp folder and renamed to ``<run>/checkpoints/step-N``.
    Resume with ``trainer.train(resume_from_checkpoint=<step-N>)``."""

    align_run_path: Path | None = None
    align_keep_last: int = 2
    # Trainer counters that transformers' checkpoint does not hold (TRL's running token count).
    align_state_attrs = (TOTAL_TOKENS_ATTR,)

    def train_resumable(self, run, stop) -> None:
        """``train()`` from ``run.resume_from`` (when set) under the signal handler ``stop``; a
        signal ends in :class:`align.guards.Interrupted` once the checkpoint is written."""
        from .guards import Interrupted

        if run.resume_from is not None:
            self.restore_align_state(run.resume_from)
        with stop:
            self.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        if stop.requested:
            raise Interrupted(stop.signum, latest_checkpoint(run.path))

    def restore_align_state(self, checkpoint: Path) -> None:
        f = Path(checkpoint) / "align_state.json"
        if f.is_file():
            for k, v in json.loads(f.read_text()).items():
                setattr(self, k, v)

    def align_save_checkpoint(self, write) -> None:
        """``write()`` = transformers' own checkpoint writer, called with output_dir on a staging folder."""
        step = self.state.global_step
        root = checkpoint_root(self.align_run_path)
        staging = root / f".tmp-step-{step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        output_dir = self.args.output_dir
        self.args.output_dir = str(staging)
        try:
            with refused_save(self.align_run_path, step, staging):
                write()  # transformers' writer: staging/checkpoint-<step>
        finally:
            self.args.output_dir = output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            extra = {k: getattr(self, k) for k in self.align_state_attrs if hasattr(self, k)}
            with refused_save(self.align_run_path, step, staging):
                (staging / f"checkpoint-{step}" / "align_state.json").write_text(json.dumps(extra))
                publish(staging / f"checkpoint-{step}", self.align_run_path, step, self.align_keep_last)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
