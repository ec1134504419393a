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
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .config import dump_yaml


class RunDir:
    def __init__(self, run_cfg, cfg, job: str):
        name = run_cfg.name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.path = Path(run_cfg.output_dir) / name
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise OSError(f"run.output_dir '{run_cfg.output_dir}': cannot write run folder: {e}") from e
        atomic_write_text(self.path / "config.yaml", dump_yaml(cfg))
        self.metrics_path = self.path / "metrics.jsonl"

    def log(self, record: dict) -> None:
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
                if logs:
                    run.log({"step": state.global_step, **logs})

        return MetricsToRun()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def write_json(self, name: str, data) -> Path:
        path = self.path / name
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        return path


def start_run(cfg, job: str) -> RunDir:
    """Seed everything from ``run.seed``, create the run folder, say where it is."""
    from transformers import set_seed

    set_seed(cfg.run.seed)
    run = RunDir(cfg.run, cfg, job)
    print(f"run folder: {run.path}")
    return run


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path):
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
