"""Data parallelism for align's own loop (PPO): torch's DistributedDataParallel for the
gradients (:func:`data_parallel`) and the few scalar collectives the loop's decisions need, and
nothing when there is one process. DPO and RM get theirs from transformers' Trainer (accelerate).

Run with ``accelerate launch --multi_gpu --num_processes N -m align.cli ppo ...`` (on a CPU-only
machine the same command starts N CPU processes on gloo; accelerate's ``--cpu`` launcher wants
MPI). Every rank holds the same weights: it samples its share of the prompts, gradients are
averaged (a sum over the *global* batch's tokens, as one process would compute), and every
decision that ends a loop -- approx-KL early stop, time budget, a signal, a NaN -- is agreed on
by all ranks, or they would wait on each other forever.
"""
from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


_DEVICE: torch.device | None = None  # this process's model.device, set by init()


def init(device: str = "auto") -> None:
    """Record where this process computes (``model.device``: the collectives' tensors go there)
    and join the process group (gloo for CPU processes, nccl for GPU ones) when launched with
    several processes."""
    global _DEVICE
    from .placement import resolve_device

    _DEVICE = resolve_device(device)
    if world_size() > 1:
        from accelerate import PartialState

        # the backend follows model.device (gloo for CPU processes even where GPUs exist), not
        # whether torch sees a GPU
        PartialState(cpu=_DEVICE.type == "cpu")


def _dist():
    import torch.distributed as dist

    return dist if world_size() > 1 and dist.is_available() and dist.is_initialized() else None


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy on :func:`device`, where the backend reduces; the identity with one
    process)."""
    dist = _dist()
    t = t.detach().to(device()).clone()
    if dist:
        dist.all_reduce(t)
    return t


def device() -> torch.device:
    """Where this rank computes (``model.device`` as :func:`init` recorded it, else
    :func:`align.placement.resolve_device`'s ``auto``). nccl reduces only GPU tensors, so every
    tensor handed to a collective is made here."""
    from .placement import resolve_device

    return _DEVICE if _DEVICE is not None else resolve_device("auto")


def all_mean(x: float) -> float:
    return float(all_sum(torch.tensor([float(x)], dtype=torch.float64, device=device()))[0]) / world_size()


def any_rank(flag: bool) -> bool:
    return bool(all_sum(torch.tensor([1.0 if flag else 0.0], device=device()))[0] > 0)


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` under torch's DistributedDataParallel when there are several processes, else
    ``module`` itself: DDP averages the gradients (a NaN on any rank reaches every rank, so the
    non-finite check after it agrees everywhere), bucketed and overlapped with the backward pass.
    ``find_unused_parameters``: each pass trains one role's adapter (the policy's or the
    critic's), so the others' parameters are unused in it. Only trainable (adapter) weights move:
    they are broadcast from rank 0 once here, and DDP's own start-up broadcast of *every* weight
    (``init_sync``) is skipped: each rank loaded the same frozen base from the same file, so
    sending it again is traffic for nothing. Buffers (rotary tables) are not re-sent at every
    forward: every rank computes them alike."""
    dist = _dist()
    if not dist:
        return module
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    dev = device()
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True, forward_sync_buffers=False, init_sync=False)


def check_shared_folder(folder) -> None:
    """Several machines must see one run folder (checkpoints, the reference-score cache and resume
    are read from it by every rank): rank 0 writes a token there, every rank reads it back, and a
    rank that cannot -- a node-local disk at the same path -- stops every rank at the start with
    an error saying so, instead of failing at the first save or hanging at resume."""
    import secrets
    from pathlib import Path

    if not _dist():
        return
    token = secrets.token_hex(8) if rank() == 0 else None
    probe = Path(folder) / f".shared-check-{gather_objects(token)[0]}"
    if rank() == 0:
        probe.write_text("align")
    barrier()
    seen = gather_objects((rank(), os.uname().nodename, probe.is_file()))
    barrier()
    if rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, host, ok in seen if not ok]
    if blind:
        raise ValueError(f"run.output_dir: the run folder '{folder}' is not the same folder on every machine "
                         f"({', '.join(blind)} cannot see what rank 0 wrote there): checkpoints, the reference "
                         "cache and --resume need one folder every machine shares; put run.output_dir on a "
                         "shared file system")


def trainer_parallelism(trainer) -> str:
    """What a transformers Trainer will shard or replicate with (``fsdp``, ``deepspeed``, ``ddp``,
    ``single``), said at the start of a DPO/RM run. A launcher that asked for FSDP
    (``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets ACCELERATE_USE_FSDP)
    where the Trainer does not apply it -- measured: on a CPU (``use_cpu``) transformers runs DDP
    instead, silently -- is said too, never left for the user to find."""
    kind = ("fsdp" if getattr(trainer, "is_fsdp_enabled", False) else
            "deepspeed" if getattr(trainer, "is_deepspeed_enabled", False) else
            "ddp" if world_size() > 1 else "single")
    asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if asked and kind != "fsdp" and rank() == 0:
        print(f"notice: the launcher asked for FSDP but the Trainer runs {kind.upper()} (as measured with "
              "model.device=cpu: transformers' Trainer does not shard there); every process holds the whole base")
    return kind


def finish() -> None:
    """End of a job: wait until rank 0 has written everything, then leave the process group on
    every rank together (a rank exiting while gloo still serves the others aborts the run)."""
    dist = _dist()
    if dist:
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    dist = _dist()
    if not dist:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
