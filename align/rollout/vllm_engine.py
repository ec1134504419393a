"""vLLM hosting the policy, colocated with the trainer: ONE engine holds the base once.

Sync strategies after each policy update:
- ``lora``:   the new adapter (only the LoRA tensors, ~MBs) is written to a RAM-backed folder
              and used through a fresh ``LoRARequest`` id; the previous version is evicted.
              No merge, no full-weight copy.
- ``merged``: the adapter is merged into the linear weights in fp32 in the trainer and the
              changed matrices are loaded into the engine's model in place (``load_weights``;
              on vLLM's CPU backend, which pre-packs weights, each linear is re-packed), for
              hardware where vLLM's LoRA kernels are slow.
- ``auto``:   measures both on a small batch at start and keeps the faster.

The parity guard (:mod:`align.rollout.parity`) checks after each sync that the engine
decodes like the trainer.
The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weights move by reference,
and a script that builds it needs no ``__main__`` spawn dance for its own code.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..chat import prompt_ids
from .base import Completion, EngineStats, RolloutEngine, SamplingConfig


class MergedSyncUnsupported(RuntimeError):
    """This vLLM build cannot load merged weights into a running engine."""


class EngineStartError(RuntimeError):
    """vLLM refused the model (architecture, dtype, LoRA layout); the message names them."""


def _refuse_transformers_fallback(base_path: str, sync: str) -> None:
    """Architectures vLLM has no model of its own for run through its transformers fallback,
    which patches transformers' classes *in this process*: the trainer's own model of that
    architecture then breaks (measured: GPT-NeoX, OLMo-2). In-process vLLM is refused for them;
    ``vllm-server`` runs vLLM in its own process. (vLLM's registry is private API: the
    architecture matrix in tests/test_architectures.py pins this check.)"""
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS

    archs = _architecture(base_path).split(", ")
    if not any(a in _TEXT_GENERATION_MODELS for a in archs):
        raise EngineStartError(f"vLLM {_vllm_version()} has no native model for {', '.join(archs)} "
                               f"('{base_path}', {sync} sync): its transformers fallback would patch the "
                               "trainer's own model classes in this process; use rollout.engine=vllm-server "
                               "(a separate process) or rollout.engine=hf")


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


def _architecture(path: str) -> str:
    import json

    try:
        return ", ".join(json.loads((Path(path) / "config.json").read_text()).get("architectures", []))
    except (OSError, ValueError):
        return "unknown architecture"


def _fast_dir() -> Path:
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="align-adapters-", dir=root))


class VLLMEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, base_path: str, tokenizer, *, dtype: str = "auto", device: str = "auto", max_lora_rank: int = 8,
                 sync: str = "lora", seed: int = 0, max_model_len: int = 1024, kv_cache_gib: int = 2,
                 memory_fraction: float | None = None, base_name: str | None = None):
        from ..placement import PlacementError, resolve_device, vllm_engine_args

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # the CPU backend's cache only
        from vllm import LLM

        _refuse_transformers_fallback(base_path, sync)
        print(f"starting the vLLM engine ({sync} sync; ~10-30 s on a CPU)", flush=True)
        self.tok = tokenizer
        self.sync_mode = sync
        self.base_name = base_name or base_path
        from .. import distributed

        try:  # a merged engine has no LoRA layers, so its weights load by HF name
            args, notices = vllm_engine_args(base_path, device=resolve_device(device), dtype=dtype,
                                             lora_rank=max_lora_rank if sync == "lora" else None, max_loras=2,
                                             max_model_len=max_model_len, seed=seed, memory_fraction=memory_fraction,
                                             world=distributed.world_size())
        except PlacementError as e:
            raise EngineStartError(str(e)) from e
        for notice in notices:
            print(f"notice: {notice}")
        self.dtype_name = args["dtype"]
        self.dtype = getattr(torch, args["dtype"])  # what the engine computes in: merged weights are cast to it
        try:
            self.llm = LLM(**args)
            # One token through the engine now: some architectures start and only fail when
            # they first run (e.g. vLLM's transformers fallback), which must not be mid-training.
            from vllm import SamplingParams

            self.llm.generate([{"prompt_token_ids": [tokenizer.eos_token_id]}], SamplingParams(max_tokens=1),
                              use_tqdm=False)
        except Exception as e:  # an architecture, dtype or LoRA layout this vLLM build refuses
            raise EngineStartError(f"vLLM {_vllm_version()} could not start for '{base_path}' "
                                   f"({_architecture(base_path)}, {sync} sync): {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}; use rollout.engine=hf") from e
        self.stats = EngineStats()
        self.version = -1
        self._lora = None  # the LoRARequest of the current version (lora mode)
        self._dir = _fast_dir()

    @classmethod
    def build(cls, opts, peft_model, tok) -> "VLLMEngine":
        """An engine serving ``peft_model`` (version 0) with ``opts.sync``; ``auto`` times one
        sync + generation round of each strategy and keeps the faster engine."""
        def make(mode):
            return cls(opts.base_path, tok, max_lora_rank=opts.max_lora_rank, sync=mode, dtype=opts.dtype,
                       device=opts.device, seed=opts.seed, base_name=opts.base_name, max_model_len=opts.max_model_len,
                       memory_fraction=opts.memory_fraction)

        if opts.sync != "auto":
            eng = make(opts.sync)
            eng.sync(peft_model, 0)
            return eng
        timing, best = {}, None
        for mode in ("merged", "lora"):
            eng = make(mode)
            try:
                timing[mode] = eng.time_round(peft_model)
            except MergedSyncUnsupported as e:
                print(f"sync auto: {e}; using lora")
                eng.close()
                continue
            if best is None or timing[mode] < timing[best.sync_mode]:
                if best is not None:
                    best.close()
                best = eng
            else:
                eng.close()
        best.auto_timing = timing
        return best

    # -- sync --------------------------------------------------------------------------
    def sync(self, peft_model, version: int) -> None:
        t0 = time.perf_counter()
        if self.sync_mode == "merged":
            self._sync_merged(peft_model)
        else:
            self._sync_lora(peft_model, version)
        self.version = version
        self.stats.syncs += 1
        self.stats.sync_seconds.append(time.perf_counter() - t0)

    def _sync_lora(self, peft_model, version: int) -> None:
        from vllm.lora.request import LoRARequest

        from ..adapters import adapter_weights, save_adapter

        path = save_adapter(peft_model, self._dir / f"v{version}", self.base_name,
                            state_dict=adapter_weights(peft_model))  # gathered on every rank when sharded
        old = self._lora
        # lora_int_id must be > 0 and unique per version: a reused id would serve cached weights.
        self._lora = LoRARequest(f"policy-v{version}", version + 1, str(path))
        self.llm.llm_engine.add_lora(self._lora)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    @torch.no_grad()
    def _merged_linear_weights(self, peft_model, adapter: str | None = "default",
                               every_lora_layer: bool = False) -> dict[str, torch.Tensor]:
        """HF-named weights of every LoRA-wrapped linear with ``adapter`` merged (in fp32, then
        cast to the engine's dtype: a trainer in another dtype than its engine must not hand it
        weights its kernels do not take -- vLLM's AMX kernels refuse a bf16/fp32 mix).
        ``every_lora_layer``: also the linears some *other* adapter wraps, as base weights (so
        switching between adapters with different targets leaves nothing of the previous one);
        ``adapter=None`` with it: the base alone."""
        from peft.tuners.lora import LoraLayer

        out = {}
        prefix = "base_model.model."
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            has = adapter is not None and adapter in module.lora_A
            if has or every_lora_layer:
                w = module.get_base_layer().weight.float()
                key = (name[len(prefix):] if name.startswith(prefix) else name) + ".weight"
                out[key] = (w + module.get_delta_weight(adapter).float() if has else w).to(self.dtype)
        return out

    def serve_merged(self, peft_model, adapter: str | None) -> None:
        """Serve the base with ``adapter`` (one of ``peft_model``'s, by its PEFT name) merged in,
        or the base alone (None): how `align eval` runs many adapters through one engine where
        vLLM's LoRA kernels are slow (its CPU backend). A merged-sync engine only."""
        if self.sync_mode != "merged":
            raise ValueError(f"serve_merged needs an engine built with sync='merged', not {self.sync_mode!r}")
        self._sync_merged(peft_model, adapter, every_lora_layer=True)

    def _sync_merged(self, peft_model, adapter: str | None = "default", every_lora_layer: bool = False) -> None:
        weights = self._merged_linear_weights(peft_model, adapter, every_lora_layer)

        def load(model):
            from vllm.config import set_current_vllm_config

            # Re-packing builds vLLM layer helpers, which read the engine's config.
            with set_current_vllm_config(self.llm.llm_engine.vllm_config):
                if any(hasattr(m, "cpu_linear") for m in model.modules()):
                    # vLLM's CPU backend pre-packs each linear's weight for oneDNN at start and
                    # drops the parameter (and its weight_loader): load_weights cannot reach it.
                    return _repack_cpu_linears(model, weights)
                model.load_weights(weights.items())
                return "load_weights"

        self.llm.apply_model(load)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._lora = None

    def time_round(self, peft_model, n_prompts: int = 16, tokens: int = 32) -> float:
        """Seconds for one sync plus one greedy generation round (for ``sync: auto``)."""
        ids = [prompt_ids(self.tok, "Tell me about the sea.")] * n_prompts
        t0 = time.perf_counter()
        self.sync(peft_model, 0)
        self.generate(ids, SamplingConfig(max_new_tokens=tokens, greedy=True))
        return time.perf_counter() - t0

    # -- generate ----------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[Completion]:
        t0 = time.perf_counter()
        sp = sampling_params(params, len(prompt_ids), self.tok.eos_token_id)
        outs = []
        for lo, hi in self._waves(prompt_ids, seeded=not params.greedy and (
                params.seed is not None or params.row_seeds is not None)):
            outs += self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids[lo:hi]],
                                      sp[lo:hi] if isinstance(sp, list) else sp,
                                      lora_request=self._lora if self.sync_mode != "merged" else None,
                                      use_tqdm=False)
        result = completions(prompt_ids, outs, self.tok)
        self.stats.generated_tokens += sum(len(c.token_ids) for c in result)
        self.stats.seconds += time.perf_counter() - t0
        return result

    def _waves(self, prompt_ids: list[list[int]], seeded: bool) -> list[tuple[int, int]]:
        """[lo, hi) slices of the requests to submit one after another. Seeded sampling on vLLM's
        CPU backend fails ("CPU Generator does not use offset") when a seeded request's prompt is
        split over two scheduler steps (chunked prefill rewinds its generator), so seeded
        requests go in waves whose prompts fit one step's token budget together; the samples
        are the same, as each request has its own seed."""
        budget = self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        if not seeded or sum(map(len, prompt_ids)) <= budget:
            return [(0, len(prompt_ids))]
        waves, lo, used = [], 0, 0
        for i, p in enumerate(prompt_ids):
            if used + len(p) > budget and i > lo:
                waves.append((lo, i))
                lo, used = i, 0
            used += len(p)
        return waves + [(lo, len(prompt_ids))]

    def close(self) -> None:
        import gc

        shutil.rmtree(self._dir, ignore_errors=True)
        self.llm = None
        gc.collect()


def sampling_params(params: SamplingConfig, n: int, eos_id: int):
    """vLLM's SamplingParams for ``params`` (one per prompt when rows carry their own seeds)."""
    from vllm import SamplingParams

    sp = SamplingParams(
        n=1, max_tokens=params.max_new_tokens, seed=params.seed, logprobs=0,
        temperature=0.0 if params.greedy else params.temperature, top_p=1.0 if params.greedy else params.top_p,
        top_k=-1, stop_token_ids=[eos_id], skip_special_tokens=True)
    if params.row_seeds is None or params.greedy:
        return sp
    out = [sp.clone() for _ in range(n)]
    for one, seed in zip(out, params.row_seeds):
        one.seed = int(seed)
    return out


def completions(prompt_ids: list[list[int]], outs, tok) -> list[Completion]:
    result = []
    for p, o in zip(prompt_ids, outs):
        c = o.outputs[0]
        ids = list(c.token_ids)
        lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)] if c.logprobs is not None else None
        result.append(Completion(p, ids, c.finish_reason == "stop", lps, text=tok.decode(ids, skip_special_tokens=True)))
    return result


class MultiAdapterEngine:
    """ONE vLLM engine holding the base once and any number of LoRA adapters by name: the base
    (no LoRA request) and every adapter answer the same prompts in one batch -- what many
    adapters on one base are for (Punica/S-LoRA batching in vLLM)."""

    def __init__(self, base_path: str, tokenizer, adapters: dict[str, str], *, dtype: str = "auto", device: str = "auto",
                 max_model_len: int = 2048, seed: int = 0, memory_fraction: float | None = None):
        import json

        from ..placement import PlacementError, resolve_device, vllm_engine_args

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        _refuse_transformers_fallback(base_path, "lora")
        ranks = [json.loads((Path(p) / "adapter_config.json").read_text())["r"] for p in adapters.values()]
        print(f"starting one vLLM engine for the base + {len(adapters)} adapter(s) (~10-30 s on a CPU)", flush=True)
        try:
            args, notices = vllm_engine_args(base_path, device=resolve_device(device), dtype=dtype,
                                             lora_rank=max(ranks, default=8), max_loras=len(adapters) + 1,
                                             max_model_len=max_model_len, seed=seed,
                                             memory_fraction=memory_fraction, colocated=False)
        except PlacementError as e:
            raise EngineStartError(str(e)) from e
        for notice in notices:
            print(f"notice: {notice}")
        try:
            self.llm = LLM(**args)
        except Exception as e:
            raise EngineStartError(f"vLLM {_vllm_version()} could not start for '{base_path}' with "
                                   f"{len(adapters)} adapters: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        self.tok = tokenizer
        self.requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
        if adapters:  # the base as an all-zero adapter: see zero_adapter
            self._zero_dir = tempfile.TemporaryDirectory(prefix="align-base-as-lora-")
            self.requests[None] = LoRARequest("base", len(adapters) + 1,
                                              zero_adapter(next(iter(adapters.values())), self._zero_dir.name))

    def generate_mixed(self, requests: list[tuple[str | None, list[int]]], params: SamplingConfig) -> list[Completion]:
        """One batched call for (adapter name or None for the base, prompt ids) requests."""
        outs = self.llm.generate([{"prompt_token_ids": p} for _, p in requests],
                                 sampling_params(params, len(requests), self.tok.eos_token_id),
                                 lora_request=[self.requests.get(name) for name, _ in requests], use_tqdm=False)
        return completions([p for _, p in requests], outs, self.tok)

    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig, names: list[str | None]) -> dict:
        """{name (None = the base): completions of every prompt}, from one batched call."""
        result = self.generate_mixed([(name, p) for name in names for p in prompt_ids], params)
        n = len(prompt_ids)
        return {name: result[i * n:(i + 1) * n] for i, name in enumerate(names)}

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()


def zero_adapter(like: str, out: str) -> str:
    """An adapter whose every weight is zero, shaped like ``like``: it answers exactly as the base.
    vLLM 0.32's CPU build applies an adapter to the no-LoRA rows of a batch that mixes them with
    LoRA rows (measured: the base's rows answered as the batch's last adapter), so in a mixed
    batch the base must be a LoRA request too."""
    from safetensors.torch import load_file, save_file

    shutil.copy(Path(like) / "adapter_config.json", Path(out) / "adapter_config.json")
    weights = load_file(str(Path(like) / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(Path(out) / "adapter_model.safetensors"))
    return out


@torch.no_grad()
def _repack_cpu_linears(model, weights: dict[str, torch.Tensor]) -> str:
    """Merged sync on vLLM's CPU backend: give each pre-packed linear its new (fused) weight and
    let vLLM pack it again. Fused layers (qkv_proj, gate_up_proj) take their parts in the
    model's ``packed_modules_mapping`` order. Every merged weight must land somewhere: a
    partial sync would serve a mix of two policies."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    fused = getattr(model, "packed_modules_mapping", {}) or {}
    used = set()
    for name, module in model.named_modules():
        if not hasattr(module, "cpu_linear"):
            continue
        prefix, _, leaf = name.rpartition(".")
        keys = [f"{prefix}.{part}.weight" for part in fused.get(leaf, [leaf])]
        present = [k in weights for k in keys]
        if not any(present):
            continue
        if not all(present):
            missing = [k for k, ok in zip(keys, present) if not ok]
            raise MergedSyncUnsupported(f"rollout.sync=merged: {name} fuses {keys}, but the "
                                        f"adapter covers only some of them (missing {missing})")
        new = torch.cat([weights[k] for k in keys], 0)
        expected = (getattr(module, "output_size_per_partition", new.shape[0]),
                    getattr(module, "input_size_per_partition", new.shape[1]))
        if tuple(new.shape) != tuple(expected):  # e.g. tensor parallelism splits the layer
            raise MergedSyncUnsupported(f"rollout.sync=merged: {name} expects {tuple(expected)}, "
                                        f"the merged weight is {tuple(new.shape)}")
        module.weight = torch.nn.Parameter(new.contiguous(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(module, remove_weight=True)
        used.update(keys)
    left = sorted(set(weights) - used)
    if left:
        raise MergedSyncUnsupported(f"rollout.sync=merged: {len(left)} merged weights match no "
                                    f"vLLM layer (e.g. {left[0]}); use rollout.sync=lora")
    return "cpu_repack"
