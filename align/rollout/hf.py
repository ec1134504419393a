"""Rollouts with transformers' ``generate`` on the trainer's own PEFT model (no copy, no sync)."""
from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .. import distributed
from ..chat import trim_at_eos
from ..scoring.logprobs import next_token_logprobs
from .base import Completion, EngineStats, RolloutEngine, SamplingConfig


class HFEngine(RolloutEngine):
    name = "hf"
    shares_trainer_weights = True  # generates with the trainer's own model object

    @classmethod
    def build(cls, opts, peft_model, tokenizer) -> "HFEngine":
        return cls(peft_model, tokenizer)

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
        sharded = distributed.sharded(self.model) and distributed.world_size() > 1
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = prompt_ids[start:start + self.batch_size]
            L = max(map(len, chunk))
            # built on the host from token lists, then moved to the model once
            ids = torch.full((len(chunk), L), pad, dtype=torch.long, device="cpu")
            attn = torch.zeros_like(ids)
            for i, p in enumerate(chunk):  # left padding for batched generation
                ids[i, L - len(p):] = torch.tensor(p, device="cpu")
                attn[i, L - len(p):] = 1
            kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            recorder = SampledLogprobs() if params.logprobs else None
            processors = [recorder] if recorder else []  # first: it must see the raw logits
            if params.greedy:
                kwargs.update(do_sample=False)
            elif params.row_seeds is not None:  # sampling as argmax(scores + per-row Gumbel noise)
                seeds = params.row_seeds[start:start + self.batch_size]
                processors.append(RowSeededSampler(seeds, params.temperature, params.top_p))
                kwargs.update(do_sample=False)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if processors:
                kwargs.update(logits_processor=LogitsProcessorList(processors))
            if gen is not None:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device="cpu")))
            dev = self.model.device
            # FSDP2: every rank must join each forward's weight gathering, so a rank whose answers
            # ended keeps stepping until all have (transformers' synced_gpus)
            res = self.model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), return_dict_in_generate=True,
                                      synced_gpus=sharded, **kwargs)
            seqs = res.sequences[:, L:]
            lps = recorder.result(seqs) if recorder else None
            for i, (p, row) in enumerate(zip(chunk, seqs.tolist())):
                row, finished = trim_at_eos(row, eos)
                out.append(Completion(p, row, finished, lps[i, :len(row)].tolist() if lps is not None else None,
                                      text=self.tok.decode(row, skip_special_tokens=True)))
        self.model.train(was_training)
        self.stats.generated_tokens += sum(len(c.token_ids) for c in out)
        self.stats.seconds += time.perf_counter() - t0
        return out


class SampledLogprobs(LogitsProcessor):
    """The log-probability of each sampled token under the raw logits (before temperature or
    top-p: the policy's own, as PPO's ratio needs), recorded as generation goes: a step's token is
    known at the next step, so one step's log-softmax (batch x vocabulary) is kept, never every
    step's logits (``output_logits``: batch x steps x vocabulary, 3 GiB for 64 answers of 256
    tokens over a 49k vocabulary). Placed first, it sees the model's logits unchanged."""

    def __init__(self):
        self.last, self.steps = None, []

    def __call__(self, input_ids, scores):
        if self.last is not None:  # the previous step's token is the newest input id
            self.steps.append(self.last.gather(1, input_ids[:, -1:]).squeeze(1))
        self.last = next_token_logprobs(scores)
        return scores

    def result(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, steps) on the host, for the generated ``tokens`` (B, steps)."""
        steps = self.steps + ([self.last.gather(1, tokens[:, -1:].to(self.last.device)).squeeze(1)]
                              if self.last is not None and tokens.size(1) > len(self.steps) else [])
        out = torch.stack(steps, 1) if steps else torch.zeros(tokens.shape, dtype=torch.float32, device="cpu")
        return out[:, :tokens.size(1)].cpu()  # one copy to the host, not one per decode step


class RowSeededSampler(LogitsProcessor):
    """Temperature + top-p sampling where row i draws from its own generator (Gumbel-max: the
    argmax of scores + Gumbel noise is a sample of softmax(scores)). transformers' sampler uses
    one stream for the whole batch, so a row's tokens would depend on its batch-mates.

    On a CPU the uniforms come from CPU generators (the measured runs' streams, unchanged). On a
    GPU each row's generator lives on the GPU, so a decode step draws there with no host work and
    no copy (its stream differs from the CPU's: a seed reproduces a run on the same kind of device)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds = [int(s) for s in seeds]
        self.gens, self.device = None, None
        self.temperature, self.top_p = temperature, top_p

    def _generators(self, device: torch.device) -> list[torch.Generator]:
        if self.gens is None:  # made on the first step, where the scores are
            self.device = device if device.type == "cuda" else torch.device("cpu")
            self.gens = [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]
        return self.gens

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            srt, idx = scores.sort(-1, descending=True)
            probs = srt.softmax(-1)
            drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest set reaching top_p
            scores = scores.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        gens = self._generators(scores.device)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=self.device) for g in gens]).to(scores.device)
        return scores - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
