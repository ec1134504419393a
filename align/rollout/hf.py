"""Rollouts with transformers' ``generate`` on the trainer's own PEFT model (no copy, no sync)."""
from __future__ import annotations

import time

import torch

from .base import Completion, EngineStats, RolloutEngine, SamplingConfig


class HFEngine(RolloutEngine):
    name = "hf"

    def __init__(self, peft_model, tokenizer, batch_size: int = 64):
        self.model, self.tok, self.batch_size = peft_model, tokenizer, batch_size
        self.stats = EngineStats()
        self.version = 0

    def sync(self, peft_model, version: int) -> None:
        # Same object as the trainer's: the new weights are already in place.
        self.model, self.version = peft_model, version
        self.stats.syncs += 1
        self.stats.sync_seconds.append(0.0)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[Completion]:
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        out: list[Completion] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = prompt_ids[start:start + self.batch_size]
            L = max(map(len, chunk))
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, p in enumerate(chunk):  # left padding for batched generation
                ids[i, L - len(p):] = torch.tensor(p)
                attn[i, L - len(p):] = 1
            kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            if params.greedy:
                kwargs.update(do_sample=False)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if gen is not None:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            seqs = self.model.generate(input_ids=ids, attention_mask=attn, **kwargs)[:, L:]
            for p, row in zip(chunk, seqs.tolist()):
                if eos in row:
                    row, finished = row[: row.index(eos) + 1], True
                else:
                    finished = False
                out.append(Completion(p, row, finished,
                                      text=self.tok.decode(row, skip_special_tokens=True)))
        self.model.train(was_training)
        self.stats.generated_tokens += sum(len(c.token_ids) for c in out)
        self.stats.seconds += time.perf_counter() - t0
        return out
