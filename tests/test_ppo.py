"""PPO on tiny models: roles are adapters on one base, and the whole job runs end to end."""
import copy
import json

import pytest
import torch

from align.config import LoraConfig, load_config
from align.models import count_base_copies
from align.ppo.actor_critic import ActorCritic


@pytest.fixture()
def ac(tiny_model):
    base, tok = tiny_model
    ac = ActorCritic(copy.deepcopy(base), LoraConfig(r=4), with_critic=True)
    torch.manual_seed(0)
    for n, w in ac.model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.2)
    return ac, base


def _logits(ac, ids, role):
    with torch.no_grad(), ac.role(role):
        return ac.model(input_ids=ids).logits


def test_roles_are_adapters_on_one_base(ac):
    ac, base = ac
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    assert torch.equal(_logits(ac, ids, "reference"), base_logits)  # reference == base, exactly
    policy = _logits(ac, ids, "policy")
    assert not torch.equal(policy, base_logits)
    assert count_base_copies(ac.model) == 1
    # the critic adapter does not leak into the policy, and vice versa
    value_lm = _logits(ac, ids, "value")
    assert not torch.equal(value_lm, policy)
    for p in ac.value_parameters():
        p.data.add_(1.0)
    assert torch.equal(_logits(ac, ids, "policy"), policy)
    # both adapters stay trainable whichever is active; the base stays frozen
    ac.use_role("value")
    assert all(p.requires_grad for p in ac.policy_parameters() + ac.value_parameters())
    assert not any(p.requires_grad for n, p in ac.model.named_parameters() if "lora_" not in n)


def test_policy_is_active_after_any_role(ac):
    """Regression: the HF engine generates from ac.model, so the critic's adapter must never
    stay active after a value pass (samples would come from the wrong model)."""
    ac, _ = ac
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    policy = _logits(ac, ids, "policy")
    ac.values(ids, torch.ones_like(ids), torch.tensor([[2, 3]]))
    assert ac.model.active_adapter == "default"
    with torch.no_grad():
        assert torch.equal(ac.model(input_ids=ids).logits, policy)
    with ac.role("reference"):
        pass
    with torch.no_grad():
        assert torch.equal(ac.model(input_ids=ids).logits, policy)


def test_gradients_reach_only_their_adapter(ac):
    ac, _ = ac
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    attn = torch.ones_like(ids)
    pos = torch.tensor([[2, 3]])
    with ac.role("policy"):
        logp, _ = ac.token_logprobs(ids, attn, pos, torch.tensor([[8, 9]]))
    logp.sum().backward()
    assert all(p.grad is not None for p in ac.policy_parameters())
    assert all(p.grad is None for p in ac.value_parameters())


def test_tiny_ppo_job_end_to_end(tmp_path, tiny_model_path):
    from align.ppo import run_ppo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say something about {w}."})
                                 for w in ["bread", "films", "Paris", "music", "rain", "tea", "cats", "maps"]))
    for adv in ("gae", "rloo"):
        cfg = load_config("ppo", None, [
            f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.text_field=prompt",
            "data.first_words=0", "data.template={text}", "data.rows_start=0", "data.rows_stop=0",
            "data.eval_prompts=2", "rollout.max_new_tokens=6", "reward.function=reward.examples:length_target",
            "ppo.iterations=2", "ppo.prompts_per_iteration=2", "ppo.samples_per_prompt=2",
            "ppo.minibatch_size=2", "ppo.eval_every=1", f"ppo.advantage={adv}",
            f"run.output_dir={tmp_path}", f"run.name={adv}", "run.save_every=1"])
        summary = run_ppo(cfg)
        run = tmp_path / adv
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if "reward_mean" in r]
        assert len(train) == 2
        for key in ("kl_per_answer", "entropy", "clipfrac", "approx_kl", "gen_tokens_per_s"):
            assert key in train[0], key
        assert ("value_loss" in train[0]) == (adv == "gae")
        assert sum("eval/reward_mean" in r for r in recs) == 3  # iteration 0, 1, 2
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert (run / "samples.jsonl").read_text().count("\n") >= 4
        assert (run / "plots.png").is_file()
        assert [d.name for d in (run / "checkpoints").iterdir()] == ["step-2", "step-1"] or \
            sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
        assert "reward_gain_in_initial_std" in summary
    # the PPO run exports like a DPO run, with its held-out before/after in the model card
    from align.export import export
    rep = export(tmp_path / "gae", tmp_path / "export", vllm_check=False)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "PPO (gae advantages)" in card and "| after |" in card and rep["adapter_max_logprob_diff"] <= 1e-5
    # checkpoint choice: a step number, and the best held-out reward among evaluated checkpoints
    rewards = {int(d.name.split("-")[1]): json.loads((d / "eval.json").read_text())["reward_mean"]
               for d in (tmp_path / "gae" / "checkpoints").iterdir()}
    best = max(rewards, key=rewards.get)
    rep = export(tmp_path / "gae", tmp_path / "best", checkpoint="best", vllm_check=False)
    assert rep["source"].endswith(f"step-{best}/adapter")
    rep = export(tmp_path / "gae", tmp_path / "step1", checkpoint="1", vllm_check=False)
    assert rep["source"].endswith("step-1/adapter")


def test_long_prompts_keep_their_last_tokens_and_set_the_engine_context(tiny_model, tmp_path):
    from align.chat import encode_prompts, prompt_ids
    from align.ppo import engine_options

    _, tok = tiny_model
    prompts = [{"messages": [{"role": "user", "content": "bread " * 400}]},
               {"messages": [{"role": "user", "content": "hi"}]}]
    full = prompt_ids(tok, prompts[0]["messages"])
    assert encode_prompts(tok, prompts, max_tokens=64) == 1
    assert prompts[0]["ids"] == full[-64:] and len(full) > 64  # the opened assistant turn survives
    assert prompts[1]["ids"] == prompt_ids(tok, prompts[1]["messages"])
    cfg = load_config("ppo", None, ["rollout.max_prompt_tokens=300", "rollout.max_new_tokens=40"])
    assert engine_options(cfg, None).max_model_len == 340


def test_ppo_shows_progress_within_an_iteration(tmp_path, tiny_model_path, capsys):
    from align.ppo import run_ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about {w}."}) for w in "abcdef"))
    run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.eval_prompts=2",
        "rollout.max_new_tokens=4", "rollout.max_prompt_tokens=8", "reward.function=reward.examples:length_target",
        "ppo.iterations=1", "ppo.prompts_per_iteration=2", "ppo.minibatch_size=4",
        f"run.output_dir={tmp_path}", "run.name=p", "run.plot=false"]))
    out = capsys.readouterr().out
    assert "[it 1/1] 4 answers: generate, reward, score ... update ... sync hf ..." in out
    assert "prompts: 6 of 6 are longer than rollout.max_prompt_tokens=8" in out
