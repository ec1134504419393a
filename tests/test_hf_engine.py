"""The hf engine's sampled-token log-probs (ppo.old_logprobs=engine): the trainer's own, recorded
step by step without keeping every step's logits."""
from __future__ import annotations

import copy

import torch

from align.config import LoraConfig
from align.ppo.actor_critic import ActorCritic
from align.ppo.experience import collate
from align.rollout.base import SamplingConfig
from align.rollout.hf import HFEngine


def test_sampled_logprobs_are_the_trainers_and_no_step_logits_are_kept(tiny_model):
    base, tok = tiny_model
    ac = ActorCritic(copy.deepcopy(base), LoraConfig(r=8), with_critic=False)
    with torch.no_grad():
        for n, p in ac.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a policy unlike the base
    engine = HFEngine(ac.model, tok, batch_size=3)  # two chunks for 5 prompts
    seen = []
    generate = ac.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return generate(*args, **kwargs)

    ac.model.generate = spy
    prompts = [tok(f"Tell me about {w}.", add_special_tokens=False)["input_ids"] for w in ("rain", "bread", "maps", "tea", "Paris")]
    comps = engine.generate(prompts, SamplingConfig(10, temperature=0.7, top_p=0.9, row_seeds=[1, 2, 3, 4, 5], logprobs=True))
    assert seen and not any(k.get("output_logits") or k.get("output_scores") for k in seen)
    tb = collate(comps, tok.pad_token_id)
    with torch.no_grad(), ac.role("policy"):
        logp, _ = ac.token_logprobs(tb)
    for i, c in enumerate(comps):
        assert len(c.logprobs) == len(c.token_ids) > 0
        assert torch.allclose(torch.tensor(c.logprobs), logp[i, :len(c.token_ids)], atol=1e-4), i
