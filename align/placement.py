"""Where a process computes and in what dtype: decided here once, asked for everywhere else.

Every job, command, engine and scorer gets its device and dtype from this module instead of
writing ``"float32"`` or ``cuda:0`` itself; the run records both (``run.json``). Rules:

- ``model.device: auto`` is this process's GPU (``LOCAL_RANK``) where torch sees one, else the CPU.
- ``model.dtype: auto`` is bf16 where the hardware computes it natively (a GPU that supports it,
  a CPU with avx512_bf16 / AMX), else float32 (emulated bf16 is slower: results/bench_dtype.json).
- On a bf16/fp16 base these stay float32: the LoRA weights (PEFT keeps adapters in fp32), the
  value and score heads, the optimizer state, and every log-probability (logits are cast to
  float32 before the log-softmax). Export merges in float32 wherever it runs.
- A vLLM engine with LoRA on CUDA never runs float32: vLLM's CUDA LoRA kernels take fp16/bf16
  only (:func:`engine_dtype`). All vLLM arguments come from :func:`vllm_engine_args`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Export merges LoRA into the base and verifies it in this dtype, whatever dtype it then saves.
MERGE_DTYPE = "float32"

# CPU features that make bf16 matmuls native (oneDNN uses them); without one, bf16 is emulated
BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")


class PlacementError(ValueError):
    """A device or dtype this machine cannot give; the message names the setting."""


def local_rank() -> int:
    """This process's index on its machine (torchrun / accelerate set ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def server_devices_of_rank(devices: str, rank: int | None = None, per_machine: int | None = None) -> str:
    """The GPUs (CUDA_VISIBLE_DEVICES) of this process's own ``vllm-server``: with several
    processes on a machine each starts one, and ``rollout.server_devices`` is split among them in
    equal consecutive groups ("4,5,6,7" over 4 processes: one GPU each) -- otherwise every
    process's server would load onto the same GPUs. "" (inherit) is kept for one process."""
    rank = local_rank() if rank is None else rank
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if per_machine is None else per_machine
    if per_machine <= 1:
        return devices
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or len(ids) % per_machine:
        raise ValueError(f"'{devices}': with {per_machine} processes on this machine, each "
                         f"starts its own vllm-server, so list a multiple of {per_machine} GPUs to split among them "
                         f"(e.g. {','.join(str(4 + i) for i in range(per_machine))})")
    n = len(ids) // per_machine
    return ",".join(ids[rank * n:(rank + 1) * n])


def cpu_bf16_feature(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first of :data:`BF16_CPU_FEATURES` this CPU lists (``/proc/cpuinfo``), or None
    (also where the flags cannot be read: assume none rather than risk an emulated, slower bf16)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((feature for feature in BF16_CPU_FEATURES if feature in flags), None)


def resolve_device(name: str = "auto") -> torch.device:
    """``model.device`` as a torch device; ``auto`` and ``cuda`` are this process's GPU."""
    if isinstance(name, torch.device):
        return name
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        raise PlacementError(f"model.device must be auto, cpu or cuda, got {name!r}")
    if not torch.cuda.is_available():
        raise PlacementError("model.device is 'cuda' but torch sees no GPU (torch.cuda.is_available() is False)")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", local_rank())


def gpu_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def auto_dtype(device: str | torch.device = "auto") -> tuple[str, str]:
    """``model.dtype: auto``: (the fastest correct dtype on this machine, why)."""
    if resolve_device(device).type == "cuda":
        if gpu_bf16(resolve_device(device)):
            return "bfloat16", "GPU with bf16"
        return "float32", "GPU without bf16"
    feature = cpu_bf16_feature()
    if feature:
        return "bfloat16", feature
    return "float32", f"this CPU has no {' / '.join(BF16_CPU_FEATURES)}: bf16 would be emulated"


def resolve_dtype(name: str, device: str | torch.device = "auto") -> str:
    """``model.dtype`` as a concrete dtype name (``auto``: :func:`auto_dtype`)."""
    if name != "auto" and name not in DTYPES:
        raise PlacementError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return auto_dtype(device)[0] if name == "auto" else name


def standalone_dtype(dtype: str, device: str | torch.device = "auto") -> str:
    """``--dtype auto`` of a command that trains nothing (eval, serve): the training rule on a
    GPU (bf16 where it has it); float32 on a CPU, where every eval and serve figure was measured
    and where vLLM's CPU build died with SIGILL running bf16 on this project's AMX Xeon
    (2026-12-04, `align eval --accuracy`, merged adapters; float32 ran)."""
    device = resolve_device(device)
    if dtype != "auto":
        return resolve_dtype(dtype, device)
    return auto_dtype(device)[0] if device.type == "cuda" else "float32"


@dataclass(frozen=True)
class Placement:
    """A process's decision: where its model lives and in what dtype, and why that dtype."""

    device: torch.device
    dtype: str
    why: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def record(self) -> dict:
        """What run.json and result files keep: the device by kind and name, the dtype."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {"device": str(self.device), "device_name": name, "dtype": self.dtype}


def place(device: str = "auto", dtype: str = "auto") -> Placement:
    """The one decision for a process: ``model.device`` and ``model.dtype`` resolved together."""
    dev = resolve_device(device)
    if dtype == "auto":
        name, why = auto_dtype(dev)
        return Placement(dev, name, f"auto: {why}")
    return Placement(dev, resolve_dtype(dtype, dev), "as configured")


def enable_tf32(placement: Placement) -> bool:
    """float32 on CUDA: matmuls and convolutions on TF32 tensor cores (10 mantissa bits in the
    product, float32 accumulation) -- what the Ampere+ default was before torch 1.12, ~8x the
    fp32 rate. A float32 run on a CPU is untouched. Returns whether it was turned on."""
    if placement.device.type != "cuda" or placement.dtype != "float32":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work: a timer read after this measures the work, not its launch."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch (a dict of tensors and other values) with its tensors on ``device``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model) -> torch.device:
    """Where a model computes: its own ``device`` (transformers, PEFT, align's scorers), else its
    first parameter's."""
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


# -- vLLM ------------------------------------------------------------------------------

# vLLM's share of GPU memory when it shares the GPU with a trainer (the trainer's base, adapters,
# optimizer and activations keep the rest), and when it has the GPU alone (eval, serve, export).
COLOCATED_MEMORY_FRACTION = 0.3
ALONE_MEMORY_FRACTION = 0.85
# vLLM's largest max_lora_rank and the slots below it: a rank is served by the smallest that holds it
LORA_RANK_SLOTS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(rank: int) -> int:
    """The smallest LoRA rank vLLM accepts as ``max_lora_rank`` that holds ``rank``."""
    for slot in LORA_RANK_SLOTS:
        if rank <= slot:
            return slot
    raise PlacementError(f"a LoRA rank of {rank} is above vLLM's largest max_lora_rank ({LORA_RANK_SLOTS[-1]})")


def engine_dtype(dtype: str, device: torch.device, lora: bool) -> tuple[str, str | None]:
    """The dtype a vLLM engine runs in, and a notice when it is not ``dtype``. vLLM's CUDA LoRA
    kernels (triton lora_shrink/expand) assert fp16/bf16 inputs: a float32 engine with LoRA on a
    GPU fails at its first LoRA request, so it runs bf16 (fp16 where the GPU has no bf16); the
    parity guard's tolerance follows the engine's dtype."""
    dtype = resolve_dtype(dtype, device)
    if device.type == "cuda" and lora and dtype == "float32":
        new = "bfloat16" if gpu_bf16(device) else "float16"
        return new, (f"vLLM's CUDA LoRA kernels take fp16/bf16 only: the engine runs {new} "
                     f"(the trainer stays float32)")
    return dtype, None


def vllm_engine_args(model: str, *, device: torch.device, dtype: str, lora_rank: int | None = None,
                     max_loras: int = 1, max_model_len: int | None = 1024, seed: int = 0,
                     memory_fraction: float | None = None, colocated: bool = True,
                     world: int = 1) -> tuple[dict, list[str]]:
    """(the keyword arguments of ``vllm.LLM``, notices): every vLLM engine align builds -- in
    process, a server, export's check, eval, serve -- is configured here. ``lora_rank`` None =
    no LoRA. On a CPU: eager (vLLM's CPU backend captures no graphs). On CUDA: CUDA graphs, and
    a GPU memory fraction set (vLLM's own default, 0.9, would take a trainer's GPU). ``lora_rank``
    is the largest adapter rank served (vLLM's slot above it is taken). ``world`` > 1 on CUDA (a
    data-parallel trainer, one engine per rank): vLLM's ``external_launcher`` executor, which
    puts each rank's engine on that rank's own GPU (``LOCAL_RANK``) within the trainer's process
    group, as TRL's colocated mode does -- without it every rank's engine lands on cuda:0."""
    dtype, notice = engine_dtype(dtype, device, lora_rank is not None)
    if memory_fraction is None:
        memory_fraction = COLOCATED_MEMORY_FRACTION if colocated else ALONE_MEMORY_FRACTION
    if not 0 < memory_fraction < 1:
        raise PlacementError(f"vLLM's GPU memory fraction must be in (0, 1), got {memory_fraction}")
    args = dict(model=model, dtype=dtype, seed=seed, enforce_eager=device.type != "cuda",
                gpu_memory_utilization=memory_fraction)
    if max_model_len:  # None: the model's own
        args["max_model_len"] = max_model_len
    if world > 1 and device.type == "cuda":
        args.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
    if lora_rank is not None:
        args.update(enable_lora=True, max_lora_rank=lora_rank_slot(lora_rank), max_loras=max_loras)
    return args, [notice] if notice else []


def vllm_server_args(engine_args: dict) -> list[str]:
    """The same settings as ``vllm serve`` flags (the model is the server's positional argument)."""
    out = []
    for key, value in engine_args.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def placement_of(model) -> Placement:
    """The placement a loaded model already has (its weights' device and dtype): what a second
    model or an engine beside it takes, so that nothing re-decides."""
    weight = model.get_input_embeddings().weight
    name = next(k for k, v in DTYPES.items() if v == weight.dtype)
    return Placement(weight.device, name, "as the loaded base")
