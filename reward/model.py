"""A reward-model scorer as a reward function: any sequence-classification model folder, or a
LoRA reward adapter from `align rm` (``ALIGN_REWARD_MODEL`` names it).

``score(prompts, completions)`` renders each (prompt, completion) as the chat the model was
trained on and returns its scalar. Note: this loads its own copy of the reward model's base;
the policy's base is not shared across the reward API boundary.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=2)
def _load(path: str):
    from align.rm import load_reward_model

    p = Path(path)
    if (p / "adapter_config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        return load_reward_model(base, adapter_dir=str(p))
    return load_reward_model(str(p))


def score(prompts, completions, **info) -> list[float]:
    from align.rm import score_texts

    path = os.environ.get("ALIGN_REWARD_MODEL")
    if not path:
        raise ValueError("set ALIGN_REWARD_MODEL to a reward model folder or an `align rm` adapter")
    model, tok = _load(path)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                     tokenize=False) for p, c in zip(prompts, completions)]
    return score_texts(model, tok, texts).tolist()
