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


def answer_ids(tok, prompt, answer, prompt_tokens: list[int] | None = None) -> list[int]:
    """Token ids of ``answer`` as it follows ``prompt`` in the rendered conversation (so that
    prompt ids + answer ids are exactly the conversation's ids): chat messages go through the
    template (its end-of-turn tokens included); plain text gets the EOS token appended."""
    if isinstance(prompt, str):
        return tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p = prompt_tokens if prompt_tokens is not None else prompt_ids(tok, prompt)
    full = tok(chat_text(tok, prompt + answer), add_special_tokens=False)["input_ids"]
    if full[:len(p)] == p:
        return full[len(p):]
    # The template renders the prompt differently inside the conversation: tokenize the text after it.
    head = chat_text(tok, prompt, add_generation_prompt=True)
    text = chat_text(tok, prompt + answer)
    return tok(text[len(head):] if text.startswith(head) else text, add_special_tokens=False)["input_ids"]


def tokenize_pair(tok, row: dict) -> dict:
    """A preference row (``prompt``, ``chosen``, ``rejected``; text or messages) as the token ids
    the packed collators take."""
    p = prompt_ids(tok, row["prompt"]) if not isinstance(row["prompt"], str) else \
        tok(row["prompt"], add_special_tokens=False)["input_ids"]
    return {"prompt_ids": p, "chosen_ids": answer_ids(tok, row["prompt"], row["chosen"], p),
            "rejected_ids": answer_ids(tok, row["prompt"], row["rejected"], p)}


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
