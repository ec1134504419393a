"""One engine vs many: K adapters served (a) by ONE vLLM engine holding the base once with the K
adapters as LoRA requests, all requests in one batch, against (b) K merged models served one
after another (each adapter merged into the base, an engine started on it, its requests
answered, the engine closed). The same mixed requests (round-robin over the adapters), greedy,
SmolLM2-135M fp32 on this CPU. One process per variant: tokens/s (generation only, and with
engine start-ups), peak RSS (b serves one model at a time), and the weights each way must hold
to serve all K at once.

    python scripts/bench_serve.py --adapters 4 --requests 64 --tokens 64 --out results/bench_serve.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup(k: int, n: int, folder: Path):
    """K random-but-trained-looking adapters on the default base, and n prompts."""
    import torch

    from align.adapters import save_adapter
    from align.assets import DEFAULT_MODEL_ID
    from align.chat import encode_prompts
    from align.config import LoraConfig, ModelConfig, load_config
    from align.data.prompts import load_prompts
    from align.models import add_policy_adapter, load_base

    torch.manual_seed(0)  # the same K adapters (lora_A's init too) in every variant's process
    base, tok = load_base(ModelConfig(name=DEFAULT_MODEL_ID, dtype="float32"))
    model, paths = add_policy_adapter(base, LoraConfig(r=8)), []
    for i in range(k):
        if i:
            model.add_adapter(f"a{i}", model.peft_config["default"])
        name = "default" if i == 0 else f"a{i}"
        g = torch.Generator().manual_seed(i)
        for pn, w in model.named_parameters():
            if "lora_B" in pn and f".{name}." in pn:
                w.data.normal_(0, 0.01, generator=g)
        paths.append(save_adapter(model, folder / f"adapter{i}", DEFAULT_MODEL_ID, adapter_name=name))
    cfg = load_config("ppo", ROOT / "configs/ppo_imdb_sentiment.yaml", [])
    prompts, _ = load_prompts(cfg.data)
    prompts = prompts[:n]
    encode_prompts(tok, prompts, 512)
    return tok, [str(p) for p in paths], [p["ids"] for p in prompts]


def child(variant: str, k: int, n: int, tokens: int) -> dict:
    from align.assets import DEFAULT_MODEL_ID, resolve_model
    from align.rollout.base import SamplingConfig
    from align.rollout.vllm_engine import MultiAdapterEngine

    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    tok, adapters, prompts = _setup(k, n, folder)
    params = SamplingConfig(tokens, greedy=True)
    per = {i: [p for j, p in enumerate(prompts) if j % k == i] for i in range(k)}  # request j -> adapter j % k
    t0, gen_seconds, generated, weights_bytes = time.perf_counter(), 0.0, 0, 0
    if variant == "one_engine":
        base_path = resolve_model(DEFAULT_MODEL_ID)
        weights_bytes = sum(f.stat().st_size for f in Path(base_path).glob("*.safetensors")) + \
            sum(f.stat().st_size for p in adapters for f in Path(p).glob("*.safetensors"))
        engine = MultiAdapterEngine(base_path, tok, {f"a{i}": p for i, p in enumerate(adapters)})
        t = time.perf_counter()  # the mixed requests in one batch, each with its own adapter
        res = engine.generate_mixed([(f"a{j % k}", p) for j, p in enumerate(prompts)], params)
        gen_seconds = time.perf_counter() - t
        generated = sum(len(c.token_ids) for c in res)
        engine.close()
    else:
        from align.adapters import load_with_adapter
        from align.rollout.vllm_engine import VLLMEngine

        for i, path in enumerate(adapters):
            merged, _ = load_with_adapter(DEFAULT_MODEL_ID, path)
            out = folder / f"merged{i}"
            merged.merge_and_unload().save_pretrained(out)
            tok.save_pretrained(out)
            weights_bytes += sum(f.stat().st_size for f in out.glob("*.safetensors"))
            del merged
            engine = VLLMEngine(str(out), tok, sync="merged")
            t = time.perf_counter()
            res = engine.generate(per[i], params)
            gen_seconds += time.perf_counter() - t
            generated += sum(len(c.token_ids) for c in res)
            engine.close()
    total = time.perf_counter() - t0
    return {"variant": variant, "adapters": k, "requests": n, "generated_tokens": generated,
            "generate_seconds": round(gen_seconds, 2), "tokens_per_s": generated / gen_seconds,
            "seconds_with_startups": round(total, 2), "tokens_per_s_with_startups": generated / total,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            # the weights each way needs to serve all K at once: (a) the base once + K adapters,
            # (b) K merged models (served here one at a time, so its peak RSS holds only one)
            "weights_gib_all_k": weights_bytes / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="results/bench_serve.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("BENCH_RESULT " + json.dumps(child(a.child, a.adapters, a.requests, a.tokens)), flush=True)
        return
    results = {}
    for variant in ("one_engine", "merged_one_after_another"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--adapters", str(a.adapters),
                               "--requests", str(a.requests), "--tokens", str(a.tokens)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[-1][len("BENCH_RESULT "):])
        print(results[variant], flush=True)
    one, many = results["one_engine"], results["merged_one_after_another"]
    results["ratios"] = {"tokens_per_s_one_vs_many": round(one["tokens_per_s"] / many["tokens_per_s"], 3),
                         "tokens_per_s_with_startups_one_vs_many": round(one["tokens_per_s_with_startups"] / many["tokens_per_s_with_startups"], 3),
                         "peak_rss_many_vs_one": round(many["peak_rss_gib"] / one["peak_rss_gib"], 3),
                         "weights_all_k_many_vs_one": round(many["weights_gib_all_k"] / one["weights_gib_all_k"], 3)}
    Path(a.out).write_text(json.dumps(results, indent=2))
    plot(results, Path(a.out).with_suffix(".png"))
    print(results["ratios"])


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["one_engine", "merged_one_after_another"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in zip(axes, ("tokens_per_s", "tokens_per_s_with_startups", "peak_rss_gib", "weights_gib_all_k"),
                              ("tokens/s (generation)", "tokens/s (with engine starts)", "peak RSS (GiB, one at a time)",
                               "weights to serve all K at once (GiB)")):
        ax.bar(["one engine\n+K LoRA", "K merged\none by one"], [results[n][key] for n in names])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
