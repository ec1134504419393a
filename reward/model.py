"""A reward-model scorer as a reward function: any sequence-classification model folder, or a
LoRA reward adapter from `align rm` (``ALIGN_REWARD_MODEL`` names it).

``score(prompts, completions, messages=...)`` renders each whole dialogue plus the completion as
the chat the model was trained on and returns its scalar. This loads its own copy of the reward
model's base: for a reward model on the policy's base (no second copy), use
``reward.kind=classifier`` in `align ppo` instead.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from tqdm.auto import tqdm


def load_reward_model(path: str):
    """(model, tokenizer) from a classifier folder, or an adapter folder on the base it names."""
    from align.adapters import load_with_adapter
    from align.artifacts import resolve

    found = resolve(path, what="ALIGN_REWARD_MODEL")
    if found.kind == "merged":
        return load_with_adapter(str(found.path), kind="classifier")
    return load_with_adapter(found.base, found.path, kind="classifier")


@torch.no_grad()
def score_texts(model, tok, texts: list[str], batch_size: int = 8, max_length: int = 256) -> torch.Tensor:
    """Scalar reward per text (right-padded batches; the model reads the last real token)."""
    model.eval()
    tok.padding_side = "right"
    out = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in tqdm(range(0, len(order), batch_size), desc="reward-model scores", leave=False):
        idx = order[s:s + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length, add_special_tokens=False)
        out.append(model(**enc.to(model.device)).logits[:, 0].float().cpu())
    scores = torch.cat(out)
    result = torch.empty_like(scores)
    result[torch.tensor(order, device="cpu")] = scores
    return result


@lru_cache(maxsize=2)
def _load(path: str):
    return load_reward_model(path)


def score(prompts, completions, messages=None, **info) -> list[float]:
    from align.chat import chat_text

    path = os.environ.get("ALIGN_REWARD_MODEL")
    if not path:
        raise ValueError("set ALIGN_REWARD_MODEL to a reward model folder or an `align rm` adapter")
    model, tok = _load(path)
    dialogues = messages or [[{"role": "user", "content": p}] for p in prompts]
    texts = [chat_text(tok, list(m) + [{"role": "assistant", "content": c}]) for m, c in zip(dialogues, completions)]
    return score_texts(model, tok, texts, max_length=1 << 30).tolist()
