"""What a path a user names is -- the one resolver every command taking a run, a checkpoint, an
adapter or an export uses (`align eval`, `align serve`, `align export`, reward/judge adapters,
``ALIGN_REWARD_MODEL``).

A path is, in this order:

- a **run folder** of align (``run.json``, or -- runs made before it -- an align
  ``config.yaml``) with its final ``adapter/`` (``model/`` after full fine-tuning), or a chosen
  checkpoint of it;
- one **checkpoint** of a run, ``RUN/checkpoints/step-N`` (named ``RUN@step-N``);
- an **export** (``align export``: ``training_config.yaml`` beside the adapter or merged model);
- a bare **adapter folder** (``adapter_config.json``);
- a **model folder** (``config.json``: a merged export or any transformers model).

The run's job is read from its manifest; only folders made before the manifest fall back to
reading it off the config's sections (:func:`align.runs.run_job`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHT_FOLDERS = ("adapter", "model")  # a run's policy: LoRA, or the whole model (lora.r: full)


class ArtifactError(ValueError):
    """The path is not what the command needs; the message names the path."""


@dataclass
class Artifact:
    name: str               # how reports name it: the folder's name, RUN@step-N for a checkpoint
    kind: str               # "adapter" (causal LM: DPO/PPO policy), "reward" (`align rm`), "merged"
    path: Path              # the adapter folder, or the model folder of a merged model
    base: str               # the base model it sits on ("" if it names none; a merged model: itself)
    job: str = ""           # dpo | ppo | rm | "" (unknown)
    run_dir: Path | None = None
    config: dict | None = None  # the run's resolved config (a run, its checkpoint, an export)

    @property
    def beta(self) -> float:
        """The implicit reward's beta: a DPO run's train.beta, else 0.1."""
        beta = ((self.config or {}).get("train") or {}).get("beta") if self.job == "dpo" else None
        return float(beta) if isinstance(beta, (int, float)) and beta > 0 else 0.1

    def held_out(self) -> dict | None:
        """The run's held-out result: DPO/RM eval.json, PPO's before/after in summary.json."""
        if self.run_dir is None:
            return None
        ev, summary = self.run_dir / "eval.json", self.run_dir / "summary.json"
        if ev.is_file():
            return json.loads(ev.read_text())
        if summary.is_file():
            data = json.loads(summary.read_text())
            return data if "eval_final" in data else None
        return None


def resolve(text: str | Path, checkpoint: str = "final", what: str = "target") -> Artifact:
    """The artifact at ``text`` (see the module's docstring); ``checkpoint`` picks a run's
    adapter: ``final`` (its ``adapter/``), ``best`` (the best evaluated checkpoint) or a step
    number. ``what`` names the argument in errors (``reward.adapter``, ``--source``...)."""
    from .runs import job_from_config, read_manifest

    p = Path(text)
    if not p.exists():
        raise ArtifactError(f"{what} '{text}' does not exist (a run folder, a checkpoint, an adapter folder "
                            "or an exported model)")
    config, run_dir, adapter, name = None, None, p, p.name
    if p.parent.name == "checkpoints" and _is_run(p.parent.parent):  # RUN/checkpoints/step-N
        run_dir = p.parent.parent
        adapter, name = _weights(p, p), f"{run_dir.name}@{p.name}"
    elif _is_run(p):
        run_dir, adapter = p, pick_checkpoint(p, checkpoint)
        if checkpoint not in ("final", ""):
            name = f"{p.name}@{(adapter.parent if adapter.name in WEIGHT_FOLDERS else adapter).name}"
    if run_dir is not None:
        config = _yaml(run_dir / "config.yaml")
        if not (adapter / ADAPTER_CONFIG).is_file() and not (adapter / "config.json").is_file():
            raise ArtifactError(f"adapter file '{adapter / ADAPTER_CONFIG}' is missing (an unfinished run? "
                                "name one of its checkpoints: --checkpoint N)")
    elif checkpoint not in ("final", ""):
        raise ArtifactError(f"--checkpoint {checkpoint} needs a run folder; '{text}' is not one")
    elif (p / "training_config.yaml").is_file():  # an export carries its run's config
        config = _yaml(p / "training_config.yaml")
    job = (read_manifest(run_dir).get("job") if run_dir else None) or job_from_config(config or {})
    if (adapter / ADAPTER_CONFIG).is_file():
        from .adapters import read_adapter_config

        acfg = read_adapter_config(adapter)  # checked: valid JSON, rank and alpha > 0 (AdapterError)
        base = ((config or {}).get("model") or {}).get("name") or acfg.get("base_model_name_or_path") or ""
        kind = "reward" if acfg.get("task_type") == "SEQ_CLS" else "adapter"
        return Artifact(name, kind, adapter, base, job, run_dir, config)
    if (adapter / "config.json").is_file():  # a merged export, any model -- or a full fine-tuning run's model/
        return Artifact(name, "merged", adapter, str(adapter), job, run_dir, config)
    raise ArtifactError(f"{what} '{text}' is neither a run folder, a checkpoint, an adapter folder nor a model "
                        f"folder (no {ADAPTER_CONFIG} or config.json in it)")


def _weights(folder: Path, otherwise: Path) -> Path:
    """A run's or checkpoint's policy: ``adapter/`` (LoRA) or ``model/`` (full fine-tuning)."""
    return next((folder / w for w in WEIGHT_FOLDERS if (folder / w).is_dir()), otherwise)


def _is_run(folder: Path) -> bool:
    """A run of align (:func:`align.runs.run_job`) with an adapter or checkpoints in it -- or a
    folder laid out like one by hand (``config.yaml`` beside ``adapter/``)."""
    from .runs import run_job

    has_weights = any((folder / w).is_dir() for w in (*WEIGHT_FOLDERS, "checkpoints"))
    return has_weights and (run_job(folder) is not None or (folder / "config.yaml").is_file())


def pick_checkpoint(run_dir: Path, checkpoint: str) -> Path:
    """The adapter folder of run ``run_dir`` at ``checkpoint`` (final | best | a step number)."""
    ckpt_root = run_dir / "checkpoints"
    steps = {}
    if ckpt_root.is_dir():
        for d in ckpt_root.glob("step-*"):
            if (d / ADAPTER_WEIGHTS).is_file() or any((d / w).is_dir() for w in WEIGHT_FOLDERS):
                steps[int(d.name.split("-")[1])] = _weights(d, d)
    if checkpoint in ("final", ""):
        return _weights(run_dir, run_dir / "adapter")
    if checkpoint == "best":
        scored = {}
        for step, d in steps.items():
            ev = d.parent / "eval.json" if d.name in WEIGHT_FOLDERS else d / "eval.json"
            if ev.is_file():  # DPO: implicit accuracy; PPO: held-out reward
                data = json.loads(ev.read_text())
                scored[step] = data.get("implicit_accuracy", data.get("reward_mean"))
        scored = {s: v for s, v in scored.items() if v is not None}
        if not scored:
            raise ArtifactError(f"--checkpoint best: no evaluated checkpoints under '{ckpt_root}'")
        return steps[max(scored, key=scored.get)]
    if checkpoint.isdigit():
        if int(checkpoint) not in steps:
            raise ArtifactError(f"--checkpoint {checkpoint}: no such step under '{ckpt_root}' "
                                f"(have: {sorted(steps) or 'none'})")
        return steps[int(checkpoint)]
    raise ArtifactError(f"--checkpoint must be 'final', 'best' or a step number, got '{checkpoint}'")


def _yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}
