"""Does an exported model/adapter decode in vLLM exactly as in transformers?

vLLM runs in a child process (its workers are spawned, and an engine holds memory we want back
at once); transformers decodes here. Both greedy, fp32.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MAX_TOKENS = 24


def _hf_greedy(out: Path, base_name: str, merged: bool, prompts: list[str]):
    """Greedy token ids from transformers, and the prompt token ids (the same ones go to vLLM)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets import resolve_model

    if merged:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(out)
    else:
        from peft import PeftModel

        where = resolve_model(base_name)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32), str(out))
        tok = AutoTokenizer.from_pretrained(where)
    model.eval()
    prompt_ids, ids = [], []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        prompt_ids.append(enc["input_ids"][0].tolist())
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        new = gen[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
        ids.append(new)
    return ids, prompt_ids


def greedy_parity(out: Path, base_name: str, *, merged: bool, prompts: list[str]) -> dict:
    from ..assets import resolve_model

    hf_ids, prompt_ids = _hf_greedy(Path(out), base_name, merged, prompts)
    job = {"model": str(out) if merged else resolve_model(base_name),
           "lora": None if merged else str(out), "prompt_ids": prompt_ids, "max_tokens": MAX_TOKENS}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, "-m", "align.rollout.vllm_check", json.dumps(job)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("VLLM_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM failed to load/decode the export (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    vllm_ids = json.loads(lines[-1][len("VLLM_RESULT "):])
    mismatches = [{"prompt": p, "hf": h, "vllm": v} for p, h, v in zip(prompts, hf_ids, vllm_ids) if h != v]
    return {"prompts": len(prompts), "match": not mismatches, "mismatches": mismatches}


def _vllm_main(job: dict) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=job["model"], dtype="float32", enforce_eager=True, seed=0,
                  max_model_len=1024)
    if job["lora"]:
        from vllm.lora.request import LoRARequest

        kwargs.update(enable_lora=True, max_lora_rank=64, max_loras=1)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    lora = LoRARequest("export", 1, job["lora"]) if job["lora"] else None
    outs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompt_ids"]], params, lora_request=lora)
    return [list(o.outputs[0].token_ids) for o in outs]


if __name__ == "__main__":
    result = _vllm_main(json.loads(sys.argv[1]))
    print("VLLM_RESULT " + json.dumps(result), flush=True)
