"""Run directories: resolved config, ``metrics.jsonl``, plots, atomic writes.

Layout of ``<output_dir>/<name>/``::

    config.yaml      the resolved config (defaults + file + overrides)
    metrics.jsonl    one JSON object per logged step / evaluation
    adapter/         the trained adapter (PEFT format, safetensors)
    eval.json        held-out evaluation
    plots.png        training curves
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import checkpoints as ck
from .atomic import atomic_write_text
from .config import dump_yaml


class RunDir:
    def __init__(self, run_cfg, cfg, job: str):
        name = run_cfg.name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.path = Path(run_cfg.output_dir) / name
        self.metrics_path = self.path / "metrics.jsonl"
        self.resume_from = None
        if not is_main_process():
            return  # other ranks of a multi-process run read, never write
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise OSError(f"run.output_dir '{run_cfg.output_dir}': cannot write run folder: {e}") from e
        atomic_write_text(self.path / "config.yaml", dump_yaml(cfg))

    def log(self, record: dict) -> None:
        if not is_main_process():
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def trainer_callback(self):
        """A transformers TrainerCallback that appends every log (TRL's metrics) to metrics.jsonl."""
        from transformers import TrainerCallback

        run = self

        class MetricsToRun(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and state.is_world_process_zero:
                    run.log({"step": state.global_step, **logs})

        return MetricsToRun()

    def read_metrics(self) -> list[dict]:
        """The logged records; a half-written last line (a killed run) is ignored."""
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write_json(self, name: str, data) -> Path:
        path = self.path / name
        if not is_main_process():
            return path
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        return path


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/torchrun (or a plain single process): the one that
    writes the run folder, checkpoints' shared files and exports."""
    from .distributed import rank

    return rank() == 0


def _shared_name(name: str) -> str:
    """Rank 0's choice of a default run name, so that every rank writes to one folder."""
    from .distributed import gather_objects, init

    init()
    return gather_objects(name)[0]


def start_run(cfg, job: str) -> RunDir:
    """Seed everything from ``run.seed``, set torch's threads (``model.threads``), create or
    reopen the run folder (``run.resume``), say where it is. ``run.resume_from`` is the
    checkpoint to continue from, or None."""
    import torch
    from transformers import set_seed

    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    set_seed(cfg.run.seed)
    resume_from = None
    if cfg.run.resume != "off":
        folder = ck.find_resume_folder(cfg.run, job)
        if folder is not None and (folder / "summary.json").exists():
            raise ValueError(f"run folder '{folder}' finished already (summary.json); nothing to resume")
        resume_from = ck.latest_checkpoint(folder) if folder is not None else None
        if resume_from is None and cfg.run.resume == "must":
            where = folder if folder is not None else f"{cfg.run.output_dir}/{job}-*"
            raise ValueError(f"--resume: no complete checkpoint in '{where}' "
                             "(checkpoints are written with run.save_every=N)")
        if resume_from is not None:
            ck.check_same_config(folder / "config.yaml", cfg)
            cfg.run.name = folder.name
    elif is_main_process() and cfg.run.name:
        folder = Path(cfg.run.output_dir) / cfg.run.name
        if (folder / "metrics.jsonl").exists() or ck.list_checkpoints(folder):
            raise ValueError(f"run folder '{folder}' holds an earlier run; continue it with --resume, "
                             "or choose another run.name")
    if not cfg.run.name:
        cfg.run.name = _shared_name(f"{job}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = RunDir(cfg.run, cfg, job)
    run.resume_from = resume_from
    if resume_from is not None:
        step = ck.checkpoint_step(resume_from)
        if is_main_process():
            gone = ck.remove_partial(run.path)
            dropped = ck.truncate_jsonl(run.metrics_path, step)
            dropped += ck.truncate_jsonl(run.path / "samples.jsonl", step, key="iteration")
            print(f"resuming from {resume_from} (step {step}); dropped {dropped} log lines written "
                  f"after it" + (f", removed unfinished saves {gone}" if gone else ""))
    print(f"run folder: {run.path}")
    return run


def plot_metrics(records: list[dict], keys: list[str], out: Path, title: str = "") -> Path | None:
    """One panel per key against ``step``; returns the PNG path (None if nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in records if r.get(k) is not None and "step" in r]
              for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
