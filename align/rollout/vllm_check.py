"""Does an exported model/adapter decode in vLLM exactly as in transformers?

vLLM runs in a child process (its workers are spawned, and an engine holds memory we want back
at once); transformers decodes here. Both greedy, both in one dtype on one kind of device: the
export's own dtype where vLLM takes it (:func:`align.placement.engine_dtype`: LoRA on a GPU is
never float32), so the comparison is like for like.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..guards import end_process_group

MAX_TOKENS = 24


def _hf_greedy(out: Path, base_name: str, merged: bool, prompts: list[str], where):
    """Greedy token ids from transformers, and the prompt token ids (the same ones go to vLLM)."""
    from ..adapters import load_with_adapter
    from ..chat import greedy_ids, prompt_ids

    placed = dict(dtype=where.dtype, device=str(where.device))
    model, tok = load_with_adapter(str(out), **placed) if merged else load_with_adapter(base_name, out, **placed)
    ids = [prompt_ids(tok, p) for p in prompts]
    return [greedy_ids(model, tok, i, MAX_TOKENS) for i in ids], ids


def greedy_parity(out: Path, base_name: str, *, merged: bool, prompts: list[str], dtype: str = "auto",
                  device: str = "auto") -> dict:
    """Greedy answers of the export in transformers and in vLLM, compared token for token."""
    from ..assets import resolve_model
    from ..placement import Placement, engine_dtype, resolve_device

    dev = resolve_device(device)
    where = Placement(dev, engine_dtype(dtype, dev, lora=not merged)[0])
    hf_ids, prompt_ids = _hf_greedy(Path(out), base_name, merged, prompts, where)
    job = {"model": str(out) if merged else resolve_model(base_name), "dtype": where.dtype, "device": str(dev),
           "lora": None if merged else str(out), "prompt_ids": prompt_ids, "max_tokens": MAX_TOKENS}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    # its own process group: on any exit of ours (a signal, a timeout, an error) the child and
    # the engine processes it spawned are ended together, never left running
    proc = subprocess.Popen([sys.executable, "-m", "align.rollout.vllm_check", json.dumps(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        end_process_group(proc)
    lines = [l for l in stdout.splitlines() if l.startswith("VLLM_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM failed to load/decode the export (exit {proc.returncode}):\n"
                           f"{stderr[-3000:]}")
    vllm_ids = json.loads(lines[-1][len("VLLM_RESULT "):])
    mismatches = [{"prompt": p, "hf": h, "vllm": v} for p, h, v in zip(prompts, hf_ids, vllm_ids) if h != v]
    return {"prompts": len(prompts), "match": not mismatches, "mismatches": mismatches, "dtype": where.dtype,
            "device": str(dev)}


def _vllm_main(job: dict) -> list[list[int]]:
    import torch
    from vllm import LLM, SamplingParams

    from ..placement import vllm_engine_args

    from ..adapters import read_adapter_config

    lora_rank = None
    if job["lora"]:
        from vllm.lora.request import LoRARequest

        lora_rank = read_adapter_config(job["lora"])["r"]
    kwargs, _ = vllm_engine_args(job["model"], device=torch.device(job["device"]), dtype=job["dtype"],
                                 lora_rank=lora_rank, max_model_len=1024, colocated=False)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    lora = LoRARequest("export", 1, job["lora"]) if job["lora"] else None
    outs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompt_ids"]], params, lora_request=lora)
    return [list(o.outputs[0].token_ids) for o in outs]


if __name__ == "__main__":
    result = _vllm_main(json.loads(sys.argv[1]))
    print("VLLM_RESULT " + json.dumps(result), flush=True)
