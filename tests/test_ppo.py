"""PPO on tiny models: roles are adapters on one base, and the whole job runs end to end."""
import copy
import json

import pytest
import torch

from align.config import LoraConfig, load_config
from align.models import live_copies
from align.ppo.actor_critic import ActorCritic


def _moved_actor(base, with_critic: bool) -> ActorCritic:
    """An actor(-critic) whose LoRA B matrices are non-zero: the policy differs from the reference."""
    ac = ActorCritic(copy.deepcopy(base), LoraConfig(r=4), with_critic=with_critic)
    torch.manual_seed(0)
    for n, w in ac.model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.2)
    return ac


@pytest.fixture()
def ac(tiny_model):
    base, _ = tiny_model
    return _moved_actor(base, with_critic=True), base


def _batch(ids, pred_pos, targets):
    from align.scoring.batch import TokenBatch

    return TokenBatch(ids, torch.ones_like(ids), None, torch.arange(len(ids)), torch.tensor(pred_pos),
                      torch.tensor(targets), torch.ones(len(targets), len(targets[0])))


def _logits(ac, ids, role):
    with torch.no_grad(), ac.role(role):
        return ac.model(input_ids=ids).logits


def test_roles_are_adapters_on_one_base(ac):
    ac, base = ac
    copies = live_copies(base.get_input_embeddings().weight)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    assert torch.equal(_logits(ac, ids, "reference"), base_logits)  # reference == base, exactly
    policy = _logits(ac, ids, "policy")
    assert not torch.equal(policy, base_logits)
    assert live_copies(base.get_input_embeddings().weight) == copies  # switching roles copied nothing
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
    ac.values(_batch(ids, [[2, 3]], [[8, 9]]))
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
    with ac.role("policy"):
        logp, _ = ac.token_logprobs(_batch(ids, [[2, 3]], [[8, 9]]))
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
            "ppo.minibatch_size=2", f"ppo.eval_every={1 if adv == 'gae' else 0}", f"ppo.advantage={adv}",
            f"run.output_dir={tmp_path}", f"run.name={adv}", "run.save_every=1"])
        summary = run_ppo(cfg)
        run = tmp_path / adv
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if "reward_mean" in r]
        assert len(train) == 2
        for key in ("kl_per_answer", "entropy", "clipfrac", "approx_kl", "gen_tokens_per_s"):
            assert key in train[0], key
        assert ("value_loss" in train[0]) == (adv == "gae")
        evals = [r["step"] for r in recs if "eval/reward_mean" in r]
        assert evals == ([0, 1, 2] if adv == "gae" else [0, 2])  # eval_every=0: still the last iteration
        assert summary["eval_final"]["kl_per_answer"] != 0.0  # the trained policy, not iteration 0 again
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert (run / "samples.jsonl").read_text().count("\n") >= 4
        assert (run / "plots.png").is_file() and (run / "heldout_vs_kl.png").is_file()
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


def _groups(tok):
    """Two prompts x three sampled answers of different lengths (one empty: cut at 0 tokens)."""
    from align.chat import prompt_ids
    from align.rollout.base import Completion

    out = []
    for text, answers in (("Tell me about bread.", [[40, 41, 42], [43], [44, 45, 46, 47, 48]]),
                          ("What is the capital of France?", [[50, 51], [52, 53, 54, 55], [56]])):
        p = prompt_ids(tok, text)
        out += [Completion(p, a, True) for a in answers]
    return out


def test_packed_answers_score_like_separate_rows(ac, tiny_model):
    from align.scoring.batch import packed_batch, rows_batch

    ac, _ = ac
    _, tok = tiny_model
    comps = _groups(tok)
    rows, packed = rows_batch(comps, tok.pad_token_id), packed_batch(comps, 3, tok.pad_token_id)
    assert packed.input_ids.shape[0] == 2 and rows.input_ids.shape[0] == 6  # a row per prompt
    assert packed.input_ids.numel() < rows.input_ids.numel()
    with torch.no_grad():
        for role in ("policy", "reference"):
            with ac.role(role):
                a, _ = ac.token_logprobs(rows)
                b, _ = ac.token_logprobs(packed)
            torch.testing.assert_close(a * rows.mask, b * packed.mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ac.values(rows) * rows.mask, ac.values(packed) * packed.mask, atol=1e-5, rtol=1e-5)
    # a minibatch that splits a group still reads the rows its samples need
    idx = torch.tensor([4, 0])
    with torch.no_grad(), ac.role("policy"):
        torch.testing.assert_close(ac.token_logprobs(packed.select(idx))[0] * rows.mask[idx],
                                   ac.token_logprobs(rows.select(idx))[0] * rows.mask[idx], atol=1e-5, rtol=1e-5)


def test_scoring_in_chunks_equals_one_pass(ac, tiny_model):
    """in_chunks (no-grad scoring under ppo.micro_batch_size) gives one pass's numbers, in
    both layouts, including a chunk size that is not a multiple of the group."""
    from align.scoring.batch import in_chunks, packed_batch, rows_batch

    ac, _ = ac
    _, tok = tiny_model
    comps = _groups(tok)
    with torch.no_grad():
        for tb, group in ((rows_batch(comps, tok.pad_token_id), 1), (packed_batch(comps, 3, tok.pad_token_id), 3)):
            whole = ac.policy_pass(tb)
            for size in (1, 2, 4):
                parts = in_chunks(ac.policy_pass, tb, size, group)
                assert parts[1] is None and parts[0].shape == whole[0].shape
                for a, b in ((whole[0], parts[0]), (whole[2], parts[2])):
                    torch.testing.assert_close(a * tb.mask, b * tb.mask, atol=1e-5, rtol=1e-5)


def test_length_sorted_chunks_cover_every_index_once_longest_first():
    from align.scoring.batch import length_sorted_chunks

    lengths = [5, 40, 7, 40, 1, 12, 30]
    chunks = length_sorted_chunks(lengths, 3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(lengths, reverse=True)  # rows of similar length share a chunk


def test_update_on_packed_rows_equals_the_update_on_separate_rows(ac, tiny_model):
    """The PPO loss's gradients (policy, critic, value head) are the same in both layouts."""
    from align.ppo import losses
    from align.scoring.batch import packed_batch, rows_batch

    ac, _ = ac
    _, tok = tiny_model
    comps = _groups(tok)
    grads = []
    for tb in (rows_batch(comps, tok.pad_token_id), packed_batch(comps, 3, tok.pad_token_id)):
        torch.manual_seed(0)
        old = torch.randn(tb.mask.shape) * 0.1 - 3
        adv, ret = torch.randn(tb.mask.shape), torch.randn(tb.mask.shape)
        ac.zero_grad(set_to_none=True)
        with ac.role("policy"):
            logp, ent = ac.token_logprobs(tb, with_entropy=True)
        pl, _ = losses.policy_loss(logp, old, adv, tb.mask)
        vl, _ = losses.value_loss(ac.values(tb), torch.zeros_like(ret), ret, tb.mask)
        (pl + 0.5 * vl - 0.01 * losses.masked_mean(ent, tb.mask)).backward()
        grads.append([p.grad.clone() for p in ac.policy_parameters() + ac.value_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_kl_penalty_in_the_loss(tiny_model):
    """ppo.kl_penalty=loss: the update's gradient is the policy loss's plus kl_coef x the
    token-mean KL to the reference (the adapter-off model), the score alone makes the
    advantage, and the KL logged is k1. k1 in the loss is a config error naming the key."""
    from align.scoring.batch import packed_batch
    from align.config import ConfigError
    from align.ppo import losses
    from align.ppo.advantages import get_estimator
    from align.ppo.experience import Experience, advantages_of
    from align.ppo.update import ppo_update

    base, tok = tiny_model
    ac = _moved_actor(base, with_critic=False)
    tb = packed_batch(_groups(tok), 3, tok.pad_token_id)
    with torch.no_grad():
        old, _, _ = ac.policy_pass(tb)
        with ac.role("reference"):
            ref, _ = ac.token_logprobs(tb)
    old, ref = old * tb.mask, ref * tb.mask
    overrides = ["ppo.samples_per_prompt=3", "ppo.prompts_per_iteration=2", "ppo.minibatch_size=6",
                 "ppo.ppo_epochs=1", "ppo.advantage=rloo", "ppo.kl_penalty=loss"]
    with pytest.raises(ConfigError, match="ppo.kl_estimator"):
        load_config("ppo", None, overrides)
    cfg = load_config("ppo", None, overrides + ["ppo.kl_estimator=k2"])

    # the advantages see the score alone; the KL kept is the log-ratio
    est, scores = get_estimator(cfg.ppo), torch.tensor([1.0, 0.0, 2.0, 0.5, 0.5, 3.0])
    kl, adv, _ = advantages_of(est, scores, old, ref, tb.mask, None, 0.3, cfg.ppo)
    torch.testing.assert_close(kl, (old - ref) * tb.mask)
    _, adv_no_kl, _ = advantages_of(est, scores, old, old, tb.mask, None, 0.3, cfg.ppo)
    torch.testing.assert_close(adv, adv_no_kl)
    reward_cfg = load_config("ppo", None, overrides[:-1]).ppo
    _, adv_in_reward, _ = advantages_of(est, scores, old, ref, tb.mask, None, 0.3, reward_cfg)
    assert not torch.allclose(adv_in_reward, adv)  # (with the KL in the score it would differ)

    exp = Experience(tb, old, ref, None, scores, kl, adv, None, [""] * 6, [""] * 6, [True] * 6, group_size=3)

    class Recorder:
        def zero_grad(self, set_to_none=True):
            ac.zero_grad(set_to_none=True)

        def step(self):
            self.grads = [p.grad.clone() for p in ac.policy_parameters()]

    opt = Recorder()
    stats = ppo_update(ac, exp, opt, cfg, kl_coef=0.3)
    ac.zero_grad(set_to_none=True)
    logp, _, _ = ac.policy_pass(tb)
    pl, _ = losses.policy_loss(logp, old, adv, tb.mask, 0.2)
    kl_term = losses.masked_mean(0.5 * (logp - ref) ** 2, tb.mask)
    (pl + 0.3 * kl_term).backward()
    params = ac.policy_parameters()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for a, b in zip(opt.grads, [p.grad for p in params]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert stats["kl_loss"] == pytest.approx(float(kl_term.detach()), rel=1e-4)
    assert float(kl_term.detach()) > 0.01  # the adapter moved the policy: there is a pull to undo


def test_micro_batches_make_the_same_update(ac, tiny_model):
    """ppo.micro_batch_size accumulates gradients over chunks of a minibatch: the step's
    gradients (policy, critic, value head) and logged losses equal one pass over it."""

    from align.scoring.batch import packed_batch
    from align.ppo.experience import Experience
    from align.ppo.update import ppo_update

    ac, _ = ac
    _, tok = tiny_model
    comps = _groups(tok)
    tb = packed_batch(comps, 3, tok.pad_token_id)
    torch.manual_seed(0)
    old = (torch.randn(tb.mask.shape) * 0.1 - 3) * tb.mask
    exp = Experience(tb, old, old, torch.zeros(tb.mask.shape), torch.zeros(6), torch.zeros(tb.mask.shape),
                     torch.randn(tb.mask.shape) * tb.mask, torch.randn(tb.mask.shape) * tb.mask,
                     [""] * 6, [""] * 6, [True] * 6, group_size=3)

    class Recorder:  # an optimizer that keeps the gradients it was asked to apply
        def zero_grad(self, set_to_none=True):
            ac.zero_grad(set_to_none=True)

        def step(self):
            self.grads = [p.grad.clone() for p in ac.policy_parameters() + ac.value_parameters()]

    runs = []
    for micro in (0, 3):
        cfg = load_config("ppo", None, ["ppo.samples_per_prompt=3", "ppo.prompts_per_iteration=2",
                                        "ppo.minibatch_size=6", "ppo.ppo_epochs=1", f"ppo.micro_batch_size={micro}",
                                        "ppo.entropy_coef=0.01"])
        opt = Recorder()
        torch.manual_seed(1)
        stats = ppo_update(ac, exp, opt, cfg)
        runs.append((opt.grads, stats))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in runs[0][0])
    # ...and both equal the hand-written loss in one backward (the update back-propagates the
    # separate critic's loss after the policy's, to hold one pass's activations at a time)
    from align.ppo import losses

    ac.zero_grad(set_to_none=True)
    logp, ent, v = ac.policy_pass(tb, with_entropy=True)
    pl, _ = losses.policy_loss(logp, exp.old_logp, exp.advantages, tb.mask, 0.2)
    vl, _ = losses.value_loss(v, exp.values, exp.returns, tb.mask, 0.2)
    (pl + 0.5 * vl - 0.01 * losses.masked_mean(ent, tb.mask)).backward()
    params = ac.policy_parameters() + ac.value_parameters()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for a, b in zip(runs[0][0], [p.grad for p in params]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for key in ("policy_loss", "value_loss", "approx_kl"):
        assert runs[0][1][key] == pytest.approx(runs[1][1][key], rel=1e-4, abs=1e-6), key
    with pytest.raises(Exception, match="ppo.micro_batch_size"):
        load_config("ppo", None, ["ppo.samples_per_prompt=3", "ppo.prompts_per_iteration=2",
                                  "ppo.minibatch_size=6", "ppo.micro_batch_size=2"])
