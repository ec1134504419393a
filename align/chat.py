"""Chat messages -> token ids, and greedy decoding, one way everywhere.

Trainer, rollout engines, parity guards and export checks must all feed a model the *same*
ids for the same prompt, or a parity check compares two different questions. So the chat
template is applied here only: ``prompt_ids`` for a prompt awaiting an answer, ``chat_text``
for a whole conversation (reward models score those).
"""
from __future__ import annotations

import torch


def as_messages(prompt) -> list[dict]:
    """A plain string is one user turn; a message list is kept as it is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


def chat_text(tok, messages, add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(as_messages(messages), tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


def prompt_ids(tok, messages) -> list[int]:
    """Token ids of a chat prompt with the assistant turn opened (the template adds any BOS)."""
    return tok(chat_text(tok, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def tokenize_pair(tok, row: dict) -> dict:
    """A preference row (``prompt``, ``chosen``, ``rejected``; text or messages) as the token ids
    the packed collators take -- the one pair tokenization of DPO (training: TRL's, which this
    reproduces; held-out: this), `align rm` and `align eval`, so the three split a pair alike
    (tests/test_dpo.py compares it with TRL's on text and chat pairs). Each side is tokenized
    whole -- the chat template on ``prompt + answer``, or plain ``prompt + answer`` text with the
    EOS text appended when it is missing -- and the answers start where the prompt's own tokens
    stop being a prefix of both (tokens that merge across the boundary go to the answers)."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        eos = tok.eos_token
        p = tok(prompt)["input_ids"]
        whole = [tok(prompt + (a if a.endswith(eos) else a + eos))["input_ids"] for a in (row["chosen"], row["rejected"])]
    else:
        p = prompt_ids(tok, prompt)
        whole = [tok(chat_text(tok, prompt + a), add_special_tokens=False)["input_ids"] for a in (row["chosen"], row["rejected"])]
    n = min(_common_prefix(p, ids) for ids in whole)
    return {"prompt_ids": p[:n], "chosen_ids": whole[0][n:], "rejected_ids": whole[1][n:]}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_prompts(tok, prompts: list[dict], max_tokens: int) -> int:
    """Give each prompt (``{"messages": ...}``) its token ids, once, in ``"ids"``; a prompt longer
    than ``max_tokens`` keeps its *last* tokens (the latest turns and the opened assistant turn).
    Returns how many were cut."""
    cut = 0
    for p in prompts:
        ids = prompt_ids(tok, p["messages"])
        cut += len(ids) > max_tokens
        p["ids"] = ids[-max_tokens:]
    return cut


def trim_at_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    """Generated ids up to and including the first EOS; ``finished`` says whether there was one."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1], True
    return ids, False


@torch.no_grad()
def greedy_ids(model, tok, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt (token ids), cut after EOS, in eval mode."""
    was_training = model.training
    model.eval()
    x = torch.tensor([ids], device=model.device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    model.train(was_training)
    return trim_at_eos(out, tok.eos_token_id)[0]


def greedy_generate(model, tok, messages, max_new_tokens: int = 32) -> str:
    """Greedy answer text to a chat prompt."""
    return tok.decode(greedy_ids(model, tok, prompt_ids(tok, messages), max_new_tokens),
                      skip_special_tokens=True)
