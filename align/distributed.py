"""Data parallelism for align's own loop (PPO) on torch's engines -- DistributedDataParallel or
FSDP2's ``fully_shard`` (:func:`data_parallel`) -- and the few scalar collectives the loop's
decisions need; nothing when there is one process. DPO and RM get theirs from transformers'
Trainer (accelerate).

Run with ``accelerate launch --config_file configs/accelerate/ddp.yaml (or fsdp.yaml)
--num_processes N -m align.cli ppo ...`` or ``torchrun`` (on a CPU-only machine the same
command starts N CPU processes on gloo). Every rank samples its share of the prompts, gradients
are averaged (a sum over the *global* batch's tokens, as one process would compute), and every
decision that ends a loop -- approx-KL early stop, time budget, a signal, a NaN -- is agreed on
by all ranks, or they would wait on each other forever. Under FSDP2 every rank must also join
every forward pass (each layer's weights are gathered from all) and every save (the adapters
are gathered from their shards: :func:`gathered_state`).
"""
from __future__ import annotations

import contextlib
import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


_DEVICE: torch.device | None = None  # this process's model.device, set by init()


def init(device: str = "auto", group: bool = False) -> None:
    """Record where this process computes (``model.device``: the collectives' tensors go there)
    and join the process group (gloo for CPU processes, nccl for GPU ones) when launched with
    several processes -- or with one, when ``group`` (FSDP2 on a single device, under torchrun)."""
    global _DEVICE
    from .placement import resolve_device

    _DEVICE = resolve_device(device)
    if world_size() > 1 or group:
        from accelerate import PartialState

        # the backend follows model.device (gloo for CPU processes even where GPUs exist), not
        # whether torch sees a GPU
        PartialState(cpu=_DEVICE.type == "cpu")
        import torch.distributed as dist

        if not dist.is_initialized():  # accelerate makes no group for a single process
            dist.init_process_group("gloo" if _DEVICE.type == "cpu" else "nccl")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


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


def share_loaded_weights(model: torch.nn.Module) -> None:
    """Under accelerate's FSDP config with RAM-efficient loading (configs/accelerate/fsdp.yaml:
    ``fsdp_cpu_ram_efficient_loading``), transformers' ``from_pretrained`` reads the file on
    each machine's first process only and gives the others zeros, for FSDP to broadcast later --
    but align scores with the model before any trainer wraps it (DPO's reference pass, PPO's
    first rollouts). Measured: PPO's first rewards on rank 1 came from an all-zero model. So
    here every weight and buffer is sent from rank 0 once, right after loading."""
    dist = _dist()
    efficient = all(os.environ.get(k, "").lower() in ("1", "true")
                    for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"))
    if not (dist and efficient):
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def parallelism(choice: str = "auto") -> str:
    """What PPO's loop trains with: ``single`` (one process), ``ddp`` or ``fsdp2``. ``auto``
    follows the launcher: accelerate's FSDP config (configs/accelerate/fsdp.yaml sets
    ACCELERATE_USE_FSDP) means fsdp2, anything else ddp."""
    if world_size() == 1:  # fsdp2 on one device only under a launcher (torchrun: a group of one)
        return "fsdp2" if choice == "fsdp2" and os.environ.get("MASTER_ADDR") else "single"
    if choice == "auto":
        return "fsdp2" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "ddp"
    return choice


def data_parallel(module: torch.nn.Module, mode: str = "ddp") -> torch.nn.Module:
    """``module`` ready for data-parallel training by ``mode`` (:func:`parallelism`); with one
    process, ``module`` itself.

    ``ddp``: torch's DistributedDataParallel averages the gradients (a NaN on any rank reaches
    every rank), bucketed and overlapped with the backward pass. ``find_unused_parameters``:
    each pass trains one role's adapter (the policy's or the critic's), so the others'
    parameters are unused in it. Only trainable (adapter) weights move: they are broadcast from
    rank 0 once here, and DDP's own start-up broadcast of *every* weight (``init_sync``) is
    skipped: each rank loaded the same frozen base from the same file. Buffers (rotary tables)
    are not re-sent at every forward: every rank computes them alike.

    ``fsdp2``: :func:`shard` -- torch's ``fully_shard`` on ``module``'s decoder layers, its
    decoder and its value head, in place; ``module`` is returned as it is (FSDP2 hooks the
    sharded modules' own forwards)."""
    dist = _dist()
    if not dist:
        return module
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    if mode == "fsdp2":
        shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = device()
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True, forward_sync_buffers=False, init_sync=False)


def shard(module: torch.nn.Module) -> None:
    """FSDP2 over every rank (torch's ``fully_shard``): each transformer block of every causal
    LM in ``module`` (the classes transformers names ``_no_split_modules``, as accelerate's
    TRANSFORMER_BASED_WRAP does), then each LM's decoder (embeddings, final norm), then any
    trainable module left outside them (a value head). Each unit's weights are gathered just
    before its forward and freed after it, its gradients reduce-scattered after its backward.
    The LM's output head stays whole on every rank: a pass calls it outside the decoder, and
    with tied embeddings it is the embedding matrix. Must run after every adapter is added and
    before the optimizer is made (the parameters become sharded DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device().type, (world_size(),))
    from transformers import PreTrainedModel

    # the causal LMs (a PEFT wrapper answers for its LM's attributes, so the class decides)
    lms = [m for m in module.modules() if isinstance(m, PreTrainedModel) and m._no_split_modules and m.base_model is not m]
    if not lms:
        raise ValueError("fsdp2: no transformers causal LM in this model to shard")
    sharded: set[int] = set()
    for lm in lms:
        blocks = set(lm._no_split_modules)
        for m in lm.modules():
            if type(m).__name__ in blocks:
                fully_shard(m, mesh=mesh, reshard_after_forward=True)
                sharded.add(id(m))
        fully_shard(lm.base_model, mesh=mesh, reshard_after_forward=True)
        sharded.add(id(lm.base_model))
    inside = {id(p) for m in module.modules() if id(m) in sharded for p in m.parameters()}
    for m in module.modules():  # outermost first: the largest trainable subtree outside the LMs
        params = list(m.parameters())
        if any(p.requires_grad for p in params) and not any(id(p) in inside for p in params):
            fully_shard(m, mesh=mesh, reshard_after_forward=True)  # e.g. the value head: its gradients reduce-scattered too
            inside |= {id(p) for p in m.parameters()}
    loose = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in inside]
    if loose:
        raise ValueError(f"fsdp2: trainable weights outside every sharded unit (e.g. '{loose[0]}'), "
                         "whose gradients no rank would average")


def sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds FSDP2-sharded weights (every rank must then join each forward,
    each gather and each save)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, on: bool):
    """Gradients of the backward passes inside are averaged over ranks (``on``), or only
    accumulated locally until a later synced backward: DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``. One process: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if on or not (units or hasattr(module, "no_sync")):
        yield
    elif units:
        for m in units:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in units:
                m.set_requires_gradient_sync(True, recurse=False)
    else:
        with module.no_sync():
            yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: an FSDP2-sharded parameter (a DTensor) is gathered from every rank -- so
    every rank must call this, in the same order -- and anything else is returned as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered_state(module: torch.nn.Module, keep) -> dict:
    """``{name: whole tensor on the CPU}`` for the entries of ``module.state_dict()`` whose name
    ``keep`` accepts -- the adapters, never the frozen base: what a save or an engine sync
    needs. Every rank must call it (sharded entries are gathered)."""
    return {n: full_tensor(t.detach()).cpu().clone() for n, t in module.state_dict(keep_vars=True).items() if keep(n)}


def set_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``param``: into this rank's shard where ``param``
    is FSDP2-sharded (no collective: every rank holds ``value``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            local = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                      src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(value)


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """``optimizer``'s state to save. Sharded (FSDP2): gathered whole by torch's
    ``get_optimizer_state_dict`` (keyed by parameter name; rank 0 gets it, on the CPU) -- every
    rank must call it; else the optimizer's own ``state_dict``."""
    if not sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, where: str) -> None:
    """Put :func:`optimizer_state`'s ``state`` back (each rank keeps its shard when sharded)."""
    by_name = any(isinstance(k, str) for g in state.get("param_groups", []) for k in g.get("params", []))
    if by_name != sharded(model):
        saved, now = ("fsdp2", "ddp or one process") if by_name else ("ddp or one process", "fsdp2")
        raise ValueError(f"{where} was written under {saved} and this run is {now}: resume with the "
                         "parallelism it was written with (ppo.parallelism, or the same launcher config)")
    if not by_name:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


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
