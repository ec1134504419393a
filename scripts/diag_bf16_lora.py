"""Why did RL with a LoRA on a bf16 base not learn on a CPU with native bf16? Checks on a trained adapter.

    python scripts/diag_bf16_lora.py ADAPTER_DIR OUT.json [SCALES]   (e.g. runs/smoke-fp32/adapter)

1. greedy accuracy of base and adapter in fp32 vs bf16 on arithmetic-heldout-100 (does the bf16
   forward keep a trained adapter's effect?)
2. the adapter's effect on its own answers' log-probs with lora_B scaled by s (a young adapter is
   a small one): the slope of the bf16 effect on the fp32 effect (1 = kept, ~0 = rounding noise)
3. the direction of a policy gradient (fixed random +-1 advantages) in bf16 vs fp32 (cosine)
OUT.json is rewritten after each step, so a cut run keeps what it measured. A diagnostic, not a
benchmark: no timing is reported.
"""
import json
import sys

import torch
from peft import PeftModel

from align.chat import as_messages, prompt_ids
from align.config import ModelConfig
from align.data.arithmetic import read_heldout
from align.models import load_base
from align.rollout.base import SamplingConfig
from align.rollout.hf import HFEngine
from align.verifiable import grade

torch.manual_seed(0)
ADAPTER = sys.argv[1]
SCALES = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0.01, 0.1, 1.0]
rows = read_heldout()[::4]
out: dict = {"adapter": ADAPTER}


def load(dtype):
    base, tok = load_base(ModelConfig(dtype=dtype))
    m = PeftModel.from_pretrained(base, ADAPTER)
    m.eval()
    B0 = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_B" in n}
    return m, tok, B0


def set_scale(m, B0, s):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in B0:
                p.copy_(B0[n] * s)


models = {d: load(d) for d in ("float32", "bfloat16")}
tok = models["float32"][1]
ids = [prompt_ids(tok, as_messages(r["prompt"])) for r in rows]
answers = [r["answer"] for r in rows]
print({d: str(next(p for n, p in m.named_parameters() if "lora_A" in n).dtype) for d, (m, _, _) in models.items()})

# 1. greedy accuracy
out["accuracy"] = {}
for d, (m, _, B0) in models.items():
    for s in (0.0, 1.0):
        set_scale(m, B0, s)
        comps = HFEngine(m, tok).generate(ids, SamplingConfig(max_new_tokens=20, greedy=True))
        g = grade([c.text for c in comps], answers)
        out["accuracy"][f"{d}_scale{s:g}"] = {k: sum(v) / len(v) for k, v in g.items()}
        print(d, s, out["accuracy"][f"{d}_scale{s:g}"], flush=True)
        if d == "float32" and s == 1.0:
            answer_ids = [c.token_ids for c in comps]  # the fp32 policy's answers, scored below

json.dump(out, open(sys.argv[2], "w"), indent=2)
# sequences: prompt + the fp32 policy's greedy answer (64 non-empty ones)
seqs = [(p, a) for p, a in zip(ids, answer_ids) if a][:64]


def answer_logps(m, with_grad=False):
    """Summed log-prob of each answer (fp32 log-softmax), one row at a time (no padding effects)."""
    res = []
    for p, a in seqs:
        x = torch.tensor([p + a])
        with torch.set_grad_enabled(with_grad):
            logits = m(input_ids=x).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(a)[:, None]).sum()
        res.append(lp)
    return torch.stack(res)


out["effect"] = {}
base_lp = {}
for d, (m, _, B0) in models.items():
    with m.disable_adapter():
        base_lp[d] = answer_logps(m)
noise = (base_lp["bfloat16"] - base_lp["float32"])
out["base_bf16_minus_fp32_logp"] = {"mean_abs": float(noise.abs().mean()), "max_abs": float(noise.abs().max())}
print("base noise", out["base_bf16_minus_fp32_logp"], flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=2)
for s in SCALES:
    eff = {}
    for d, (m, _, B0) in models.items():
        set_scale(m, B0, s)
        eff[d] = answer_logps(m) - base_lp[d]
    f, b = eff["float32"], eff["bfloat16"]
    slope = float((f * b).sum() / (f * f).sum())
    corr = float(torch.corrcoef(torch.stack([f, b]))[0, 1])
    out["effect"][f"{s:g}"] = {"fp32_mean_abs": float(f.abs().mean()), "bf16_mean_abs": float(b.abs().mean()),
                               "slope_bf16_on_fp32": slope, "corr": corr}
    print("effect", s, out["effect"][f"{s:g}"], flush=True)
    json.dump(out, open(sys.argv[2], "w"), indent=2)

# 3. gradient direction: loss = -sum(adv * logp), fixed random +-1 advantages
adv = torch.randint(0, 2, (len(seqs),)).float() * 2 - 1
out["gradient"] = {}
for s in SCALES:
    grads = {}
    for d, (m, _, B0) in models.items():
        set_scale(m, B0, s)
        for n, p in m.named_parameters():
            p.grad = None
            p.requires_grad_("lora_" in n)
        loss = -(adv * answer_logps(m, with_grad=True)).sum()
        loss.backward()
        grads[d] = torch.cat([p.grad.flatten().float() for n, p in m.named_parameters() if p.grad is not None])
    f, b = grads["float32"], grads["bfloat16"]
    out["gradient"][f"{s:g}"] = {"cosine": float(torch.nn.functional.cosine_similarity(f, b, 0)),
                                 "norm_ratio_bf16_over_fp32": float(b.norm() / f.norm())}
    print("grad", s, out["gradient"][f"{s:g}"], flush=True)
    json.dump(out, open(sys.argv[2], "w"), indent=2)

json.dump(out, open(sys.argv[2], "w"), indent=2)
