"""Reward kinds in PPO: a reward model or a DPO adapter put on the policy's own base scores
exactly what the same adapter scores when loaded on its own, no second base copy is made, and a
reward function sees the whole dialogue."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from align.config import LoraConfig, ModelConfig, load_config
from align.models import add_policy_adapter, live_copies, load_base
from align.ppo.actor_critic import ActorCritic
from align.scorers import AdapterReward

PROMPTS = [[{"role": "user", "content": "Hi, can you help me bake bread?"},
            {"role": "assistant", "content": "Sure, what kind?"},
            {"role": "user", "content": "Something simple."}],
           [{"role": "user", "content": "What is the capital of France?"}]]
ANSWERS = ["Mix flour, water, salt and yeast.", "Paris."]


@pytest.fixture(scope="module")
def rm_adapter(tiny_model_path, tmp_path_factory):
    """An `align rm`-style SEQ_CLS adapter with non-trivial LoRA and score weights."""
    from align.adapters import save_adapter
    from align.rm import new_reward_model

    model, tok = new_reward_model(ModelConfig(name=tiny_model_path), LoraConfig(r=4))
    torch.manual_seed(0)
    for n, w in model.named_parameters():
        if "lora_B" in n or "score" in n:
            w.data.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("rm") / "adapter"
    save_adapter(model, out, tiny_model_path, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def dpo_adapter(tiny_model, tiny_model_path, tmp_path_factory):
    from align.adapters import save_adapter

    base, _ = tiny_model
    model = add_policy_adapter(copy.deepcopy(base), LoraConfig(r=4))
    torch.manual_seed(1)
    for n, w in model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    save_adapter(model, out, tiny_model_path)
    return out, model


def _rollouts(tok, finished=(True, True)):
    """Prompt and answer token ids as the engine would hand them over."""
    from align.chat import prompt_ids

    p = [prompt_ids(tok, m) for m in PROMPTS]
    c = [tok(a, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if f else [])
         for a, f in zip(ANSWERS, finished)]
    return p, c


def test_reward_model_on_the_policy_base_scores_like_the_model_loaded_alone(tiny_model_path, rm_adapter):
    from align.adapters import load_with_adapter
    from align.chat import chat_text

    base, tok = load_base(ModelConfig(name=tiny_model_path))
    copies = live_copies(base.get_input_embeddings().weight)
    ac = ActorCritic(base, LoraConfig(r=4), with_critic=True)
    assert ac.add_scorer("reward", rm_adapter)
    assert live_copies(base.get_input_embeddings().weight) == copies  # policy, critic, reward: one base
    p, c = _rollouts(tok)
    got = AdapterReward(ac, tok, "reward", "classifier", 0.0, rm_adapter)(
        ["x", "y"], ANSWERS, prompt_ids=p, completion_ids=c, truncated=[False, False])
    # the same adapter, loaded alone as transformers' sequence classifier, on the rendered dialogue
    alone, tok2 = load_with_adapter(tiny_model_path, rm_adapter, kind="classifier")
    with torch.no_grad():
        want = [float(alone(**tok2(chat_text(tok2, m + [{"role": "assistant", "content": a}]), return_tensors="pt",
                                   add_special_tokens=False)).logits[0, 0]) for m, a in zip(PROMPTS, ANSWERS)]
    assert got == pytest.approx(want, abs=1e-4)
    assert abs(got[0] - got[1]) > 1e-3  # the scores are not trivially equal
    # scored one row at a time (longest first), each score still lands on its own answer
    assert len(p[0]) + len(c[0]) != len(p[1]) + len(c[1])
    one_by_one = AdapterReward(ac, tok, "reward", "classifier", 0.0, rm_adapter, batch_size=1)(
        ["x", "y"], ANSWERS, prompt_ids=p, completion_ids=c, truncated=[False, False])
    assert one_by_one == pytest.approx(got, abs=1e-5)
    # two answers to one prompt packed in one row score as in two rows (each at its own last token)
    from align.scoring.batch import Answer, packed_batch, rows_batch

    group = [Answer(p[0], c[0]), Answer(p[0], c[1])]
    packed = ac.last_token_scores(packed_batch(group, 2, tok.pad_token_id), "reward")
    torch.testing.assert_close(packed, ac.last_token_scores(rows_batch(group, tok.pad_token_id), "reward"), atol=1e-5, rtol=1e-5)
    assert abs(float(packed[0] - packed[1])) > 1e-3
    # the scorer is frozen and stays out of what training changes and checkpoints hold
    assert not any(p.requires_grad for n, p in ac.named_parameters() if ".reward." in n or "score_heads" in n)
    assert not any(".reward." in n for n in ac.trained_state())


def test_a_role_named_like_a_run_folder_loads_and_scores(tiny_model_path, rm_adapter):
    """Roles are named after run folders and paths (`align eval runs/lr1e-3.v2@step-1`); PEFT takes
    no "." in an adapter name, so each role gets an adapter name of its own -- distinct even where
    two roles clean up to the same one -- and scores as under a plain name."""
    from align.scoring.batch import Answer, rows_batch

    base, tok = load_base(ModelConfig(name=tiny_model_path))
    ac = ActorCritic(base, LoraConfig(r=4), with_critic=True)
    roles = ("reward", "runs/lr1e-3.v2@step-1", "runs/lr1e-3_v2_step-1")
    assert all(ac.add_scorer(r, rm_adapter) for r in roles)
    assert len({ac.adapter_of(r) for r in roles}) == 3
    p, c = _rollouts(tok)
    tb = rows_batch([Answer(p[0], c[0])], tok.pad_token_id)
    for r in roles[1:]:
        torch.testing.assert_close(ac.last_token_scores(tb, r), ac.last_token_scores(tb, "reward"))
    with pytest.raises(ValueError, match="already loaded"):
        ac.add_scorer("reward", rm_adapter)


def test_dpo_adapter_reward_is_its_implicit_reward(tiny_model_path, dpo_adapter):
    adapter, trained = dpo_adapter
    base, tok = load_base(ModelConfig(name=tiny_model_path))
    copies = live_copies(base.get_input_embeddings().weight)
    ac = ActorCritic(base, LoraConfig(r=4), with_critic=False)
    assert not ac.add_scorer("judge", adapter)
    p, c = _rollouts(tok)
    got = AdapterReward(ac, tok, "judge", "dpo", 0.1, adapter)(
        ["x", "y"], ANSWERS, prompt_ids=p, completion_ids=c, truncated=[False, False])
    want = []
    with torch.no_grad():
        for pi, ci in zip(p, c):
            ids = torch.tensor([pi + ci])
            lp = trained(input_ids=ids).logits[0, len(pi) - 1:-1].log_softmax(-1)
            with trained.disable_adapter():
                lr = trained(input_ids=ids).logits[0, len(pi) - 1:-1].log_softmax(-1)
            t = torch.tensor(ci)
            want.append(0.1 * float((lp.gather(-1, t[:, None]) - lr.gather(-1, t[:, None])).sum()))
    assert got == pytest.approx(want, abs=1e-4)
    assert live_copies(base.get_input_embeddings().weight) == copies


def test_reward_kind_must_match_the_adapter(tiny_model_path, rm_adapter, tmp_path):
    from align.config import ConfigError
    from align.scorers import make_reward

    base, tok = load_base(ModelConfig(name=tiny_model_path))
    ac = ActorCritic(base, LoraConfig(r=4), with_critic=False)
    cfg = load_config("ppo", None, ["reward.kind=dpo", f"reward.adapter={rm_adapter}", f"model.name={tiny_model_path}"])
    with pytest.raises(ConfigError, match="is a reward model .score head., so reward.kind should be classifier"):
        make_reward(cfg.reward, ac, tok, "reward", tiny_model_path)
    cfg = load_config("ppo", None, ["reward.kind=classifier", f"reward.adapter={tmp_path}"])
    with pytest.raises(ConfigError, match="neither an adapter folder nor a run folder"):
        make_reward(cfg.reward, ac, tok, "reward", tiny_model_path)


MESSAGES_SEEN = '''
import json, os
def fn(prompts, completions, messages, **info):
    with open(os.environ["SEEN"], "a") as f:
        f.write(json.dumps(messages) + "\\n")
    return [float(len(c)) for c in completions]
def plain(prompts, completions):
    return [1.0 for c in completions]
'''


def test_reward_function_sees_the_whole_dialogue_and_plain_functions_still_work(tmp_path, tiny_model_path,
                                                                               monkeypatch):
    from align.ppo import run_ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": m}) for m in PROMPTS * 3))
    (tmp_path / "r.py").write_text(MESSAGES_SEEN)
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.jsonl"))
    common = [f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.eval_prompts=2",
              "rollout.max_new_tokens=4", "ppo.iterations=1", "ppo.prompts_per_iteration=2",
              "ppo.minibatch_size=4", "ppo.advantage=rloo", f"run.output_dir={tmp_path}", "run.plot=false"]
    run_ppo(load_config("ppo", None, [*common, f"reward.function={tmp_path / 'r.py'}:fn", "run.name=a"]))
    seen = [m for line in (tmp_path / "seen.jsonl").read_text().splitlines() for m in json.loads(line)]
    assert PROMPTS[0] in seen  # the three-turn dialogue, whole
    run_ppo(load_config("ppo", None, [*common, f"reward.function={tmp_path / 'r.py'}:plain", "run.name=b"]))


def test_ppo_with_reward_model_and_judge_adapters_end_to_end(tmp_path, tiny_model_path, rm_adapter, dpo_adapter):
    """kind classifier as the reward and a DPO adapter as the judge, on the policy's base: the run
    logs judge scores at each evaluation and ends with base vs policy answers side by side."""
    from align.ppo import run_ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": m}) for m in PROMPTS * 4))
    summary = run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.eval_prompts=3",
        "rollout.max_new_tokens=6", "ppo.iterations=2", "ppo.eval_every=2", "ppo.prompts_per_iteration=2",
        "ppo.minibatch_size=4", "reward.kind=classifier", f"reward.adapter={rm_adapter}",
        "judge.kind=dpo", f"judge.adapter={dpo_adapter[0]}", f"run.output_dir={tmp_path}", "run.name=rj",
        "run.plot=false"]))
    sbs = summary["side_by_side"]
    rows = [json.loads(line) for line in (tmp_path / "rj" / "heldout_side_by_side.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"base", "policy", "judge_base", "judge_policy", "reward_base"} <= set(rows[0])
    wins = [1.0 if r["judge_policy"] > r["judge_base"] else 0.5 if r["judge_policy"] == r["judge_base"] else 0.0
            for r in rows]  # by hand, from the stored judge scores
    lo, hi = sbs["judge_win_rate_ci95"]
    assert sbs["prompts"] == 3 and sbs["judge_win_rate"] == pytest.approx(sum(wins) / 3, abs=5e-5) and lo <= sum(wins) / 3 <= hi
    evals = [json.loads(line) for line in (tmp_path / "rj" / "metrics.jsonl").read_text().splitlines()
             if "eval/judge_mean" in line]
    assert [e["step"] for e in evals] == [0, 2]


def test_reward_of_several_terms_is_their_weighted_sum_on_one_base(tiny_model_path, rm_adapter, dpo_adapter):
    """reward.also: a DPO adapter's implicit reward + 0.5 x a reward model, both roles on the
    policy's base, equals the two scored separately and added by hand."""
    from align.scorers import make_reward

    base, tok = load_base(ModelConfig(name=tiny_model_path))
    copies = live_copies(base.get_input_embeddings().weight)
    ac = ActorCritic(base, LoraConfig(r=4), with_critic=False)
    cfg = load_config("ppo", None, ["reward.kind=dpo", f"reward.adapter={dpo_adapter[0]}", "reward.beta=0.1",
                                    f"reward.also=[classifier:{rm_adapter}]", "reward.also_weights=[0.5]",
                                    f"model.name={tiny_model_path}"])
    fn = make_reward(cfg.reward, ac, tok, "reward", tiny_model_path)
    assert live_copies(base.get_input_embeddings().weight) == copies
    p, c = _rollouts(tok)
    info = dict(prompt_ids=p, completion_ids=c, truncated=[False, False])
    got = fn(["x", "y"], ANSWERS, **info)
    dpo = AdapterReward(ac, tok, "reward", "dpo", 0.1, dpo_adapter[0])(["x", "y"], ANSWERS, **info)
    rm = AdapterReward(ac, tok, "reward_1", "classifier", 0.0, rm_adapter)(["x", "y"], ANSWERS, **info)
    assert got == pytest.approx([d + 0.5 * r for d, r in zip(dpo, rm)], abs=1e-5)
    assert min(abs(x) for x in rm) > 1e-3 and min(abs(x) for x in dpo) > 1e-4  # both terms count
    assert fn.last_means == pytest.approx({"reward": sum(dpo) / 2, "reward_1": sum(rm) / 2}, abs=1e-5)


def test_reward_terms_are_checked_before_anything_loads(tiny_model_path, rm_adapter, dpo_adapter):
    from align.config import ConfigError

    common = ["reward.kind=dpo", f"reward.adapter={dpo_adapter[0]}"]
    with pytest.raises(ConfigError, match=r"reward.also\[0\]' must be classifier:PATH"):
        load_config("ppo", None, [*common, f"reward.also=[{rm_adapter}]"])
    with pytest.raises(ConfigError, match="reward.also_weights' must give one weight per reward.also term"):
        load_config("ppo", None, [*common, f"reward.also=[classifier:{rm_adapter}]", "reward.also_weights=[1, 2]"])
    with pytest.raises(ConfigError, match="judge.adapter' is a term of the reward"):
        load_config("ppo", None, [*common, f"reward.also=[classifier:{rm_adapter}]", "judge.kind=classifier",
                                  f"judge.adapter={rm_adapter}"])
    with pytest.raises(ConfigError, match="judge.adapter' is a term of the reward"):
        load_config("ppo", None, [*common, "judge.kind=dpo", f"judge.adapter={dpo_adapter[0]}"])


def test_ppo_with_a_reward_of_two_terms_logs_each_term(tmp_path, tiny_model_path, rm_adapter):
    from align.ppo import run_ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": m}) for m in PROMPTS * 3))
    (tmp_path / "r.py").write_text(MESSAGES_SEEN)
    run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.eval_prompts=2",
        "rollout.max_new_tokens=4", "ppo.iterations=1", "ppo.prompts_per_iteration=2", "ppo.minibatch_size=4",
        "ppo.advantage=rloo", f"reward.function={tmp_path / 'r.py'}:plain", f"reward.also=[classifier:{rm_adapter}]",
        "reward.also_weights=[2.0]", f"run.output_dir={tmp_path}", "run.name=sum", "run.plot=false"]))
    evals = [json.loads(line) for line in (tmp_path / "sum" / "metrics.jsonl").read_text().splitlines()
             if "eval/reward_mean" in line]
    assert evals and all(e["eval/reward_mean"] == pytest.approx(e["eval/reward_mean_reward"]
                                                                + 2.0 * e["eval/reward_mean_reward_1"], abs=1e-5)
                         for e in evals)
    assert all(e["eval/reward_mean_reward"] == 1.0 for e in evals)  # `plain` scores every answer 1
