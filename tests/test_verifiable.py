"""RL with verifiable rewards: the verifier rewards, the arithmetic task, row fields reaching the
reward, TRL's reward convention (keywords, conversational completions, None), the group-RL
options against hand computations, and held-out accuracy."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from align.config import load_config
from align.ppo import losses
from reward.api import RewardError, call_reward
from reward.verify import (exact_match, last_number, math_match, number_only, number_only_match,
                           numeric_match, only_number)


# -- the verifiers -------------------------------------------------------------------------

@pytest.mark.parametrize("text, last, only", [
    ("12", 12, 12), ("12.", 12, 12), (" 12 \n", 12, 12), ("12.0", 12, 12), ("-5", -5, -5), ("−5", -5, -5),
    ("1,234", 1234, 1234), ("$12$", 12, 12),
    ("The answer is 12.", 12, None), ("3 + 9 = 12", 12, None), ("12 or 13", 13, None),
    ("13, no: 12", 12, None), ("12 12", 12, None), ("\\boxed{12}", 12, None), ("x = -3.5", -3.5, None),
    ("no number", None, None), ("a12", None, None), ("12abc", None, None), ("1,23", 23, None),
])
def test_numbers_are_read_as_people_write_them(text, last, only):
    assert last_number(text) == last and only_number(text) == only


def test_the_graders_by_hand():
    answers = ["12", "12", "12", "-5", "1234", "7"]
    said = ["12", "3 + 9 = 12", "12 or 13", "-5.", "1,234", "The answer is 7"]
    assert numeric_match(said, answer=answers) == [1, 1, 0, 1, 1, 1]
    assert number_only_match(said, answer=answers) == [1, 0, 0, 1, 1, 0]
    assert exact_match(said, answer=answers) == [1, 0, 0, 1, 0, 0]
    assert number_only(["12", "twelve", "12 or 13", "-4"]) == [1, 0, 0, 1]
    # TRL's name for the field and its conversational completions work too
    assert numeric_match([[{"role": "assistant", "content": "it is 12"}]], solution=["12.0"]) == [1]
    with pytest.raises(ValueError, match="'answer'"):
        numeric_match(["12"])


def test_math_verify_in_a_worker_thread_without_its_alarm():
    """Rewards run in align's worker thread, where SIGALRM cannot be used: math_match turns
    math-verify's timeouts off (it would raise ValueError in a thread otherwise)."""
    got = {}

    def work():
        got["out"] = math_match(["\\boxed{\\frac{1}{2}}", "0.5", "1/3", "It is 1,234", "two"],
                                answer=["0.5", "\\frac{1}{2}", "0.5", "1234", "2"])
        got["none"] = math_match(["1"], answer=["\\frac{"])  # an unparsable reference: no score

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert got["out"] == [1.0, 1.0, 0.0, 1.0, 0.0] and got["none"] == [None]


# -- the task --------------------------------------------------------------------------------

def test_the_heldout_file_is_fixed_and_disjoint_from_training():
    from align.data.arithmetic import (HELDOUT_FILE, HELDOUT_KINDS, make_heldout, make_train, normalise,
                                       read_heldout)

    held = read_heldout()
    assert HELDOUT_FILE.read_text() == "".join(json.dumps(r) + "\n" for r in make_heldout())  # regenerates
    assert len(held) >= 400 and {r["difficulty"] for r in held} == set(HELDOUT_KINDS)
    assert all(sum(r["difficulty"] == k for r in held) == 100 for k in HELDOUT_KINDS)
    assert len({normalise(r["prompt"]) for r in held}) == len(held)
    for r in held:  # every answer is right
        a, op, b = r["prompt"].removeprefix("What is ").split("?")[0].split()
        assert int(r["answer"]) == eval(f"{a} {op} {b}")
    train = make_train(8000, seed=3)
    assert len(train) == 8000 and not {normalise(r["prompt"]) for r in train} & {normalise(r["prompt"]) for r in held}
    assert make_train(50, seed=3) != make_train(50, seed=4)


def test_the_validation_file_is_fixed_and_in_no_heldout_file():
    """What learning rates are tuned on: 400 two-digit problems, right, distinct, in neither held-out
    file; a run evaluated on it trains on none of them."""
    from align.data.arithmetic import HELDOUT_1000_FILE, VALIDATION_FILE, make_validation, normalise, read_heldout
    from align.data.prompts import load_prompts

    rows = read_heldout(VALIDATION_FILE)
    assert VALIDATION_FILE.read_text() == "".join(json.dumps(r) + "\n" for r in make_validation())
    texts = {normalise(r["prompt"]) for r in rows}
    assert len(texts) == 400 and not texts & {normalise(r["prompt"]) for r in read_heldout(HELDOUT_1000_FILE)}
    assert {k: sum(r["difficulty"] == k for r in rows) for k in {r["difficulty"] for r in rows}} == {"2-digit +": 200, "2-digit -": 200}
    for r in rows:
        a, op, b = r["prompt"].removeprefix("What is ").split("?")[0].split()
        assert int(r["answer"]) == eval(f"{a} {op} {b}")
    train, held = load_prompts(load_config("ppo", None, ["data.dataset=arithmetic", "data.eval_prompts=0",
                                                         "data.eval_dataset=arithmetic-validation"]).data)
    assert {normalise(m["messages"][-1]["content"]) for m in held} == texts
    assert not texts & {normalise(m["messages"][-1]["content"]) for m in train}


def test_the_1000_problem_heldout_file_is_fixed_and_held_out():
    """The study set: the fixed 400 plus 300 more of each two-digit kind, all distinct, all
    right; a run judged on it trains on none of its problems."""
    from align.data.arithmetic import HELDOUT_1000_FILE, make_heldout_1000, normalise, read_heldout
    from align.data.prompts import load_prompts

    rows = read_heldout(HELDOUT_1000_FILE)
    assert HELDOUT_1000_FILE.read_text() == "".join(json.dumps(r) + "\n" for r in make_heldout_1000())
    assert rows[:400] == read_heldout() and len({normalise(r["prompt"]) for r in rows}) == 1000
    assert {k: sum(r["difficulty"] == k for r in rows) for k in {r["difficulty"] for r in rows}} == {
        "1-digit +": 100, "1-digit *": 100, "2-digit +": 400, "2-digit -": 400}
    for r in rows:
        a, op, b = r["prompt"].removeprefix("What is ").split("?")[0].split()
        assert int(r["answer"]) == eval(f"{a} {op} {b}")
    train, held = load_prompts(load_config("ppo", None, ["data.dataset=arithmetic", "data.eval_prompts=0",
                                                         "data.eval_dataset=arithmetic-heldout-1000"]).data)
    assert len(held) == 1000
    texts = {normalise(m["messages"][-1]["content"]) for m in held}
    assert not texts & {normalise(m["messages"][-1]["content"]) for m in train} and len(train) > 7000


def test_load_prompts_keeps_row_fields_and_holds_out_the_fixed_file(tmp_path):
    from align.data.prompts import load_prompts
    from align.data.rows import DataError

    cfg = load_config("ppo", None, ["data.dataset=arithmetic", "data.eval_prompts=0", "data.rows_stop=300"]).data
    train, held = load_prompts(cfg)
    assert len(held) == 400 and len(train) == 300
    assert held[0]["fields"] == {"answer": "0", "difficulty": "1-digit +"}  # file order, not shuffled
    assert all(set(p["fields"]) == {"answer", "difficulty"} for p in train)

    rows = tmp_path / "qa.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?", "solution": str(i + 1), "level": i % 2})
                              for i in range(10)))
    mine = tmp_path / "mine.jsonl"  # a user's own held-out file; its prompts leave training
    mine.write_text(json.dumps({"prompt": "What is 3 + 1?", "solution": "4"}) + "\n")
    train, held = load_prompts(load_config("ppo", None, [f"data.dataset={rows}", f"data.eval_dataset={mine}"]).data)
    assert len(held) == 1 and len(train) == 9 and held[0]["fields"] == {"solution": "4"}
    assert sorted(p["fields"]["solution"] for p in train) == sorted(str(i + 1) for i in range(10) if i != 3)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "messages": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1.*'messages'.*reward keyword"):
        load_prompts(load_config("ppo", None, [f"data.dataset={bad}"]).data)


# -- the reward convention -------------------------------------------------------------------

def _samples_and_completions(texts, answers):
    from align.rollout.base import Completion

    samples = [{"messages": [{"role": "user", "content": f"q{i}"}], "fields": {"solution": a, "id": i}}
               for i, a in enumerate(answers)]
    return samples, [Completion([1, 2], [3], True, text=t) for t in texts]


def test_row_fields_reach_trl_reward_functions_unchanged():
    """TRL's accuracy_reward (conversational completions, solution=, None for an unparsable
    reference) runs as the reward with reward.completions=messages; None becomes NaN."""
    from trl.rewards import accuracy_reward

    from align.scorers import score_completions

    samples, comps = _samples_and_completions(["\\boxed{4}", "5", "\\boxed{6}"], ["$4$", "$4$", "\\frac{"])
    cfg = load_config("ppo", None, ["reward.completions=messages"]).reward
    got = score_completions(accuracy_reward, samples, comps, cfg)
    assert got[:2].tolist() == [1.0, 0.0] and math.isnan(got[2])

    seen = {}

    def plain(prompts, completions, solution, id):  # a plain function naming the fields it takes
        seen.update(prompts=prompts, completions=completions, solution=solution, id=id)
        return [float(c == s) for c, s in zip(completions, solution)]

    text_cfg = load_config("ppo", None, []).reward
    assert score_completions(plain, *_samples_and_completions(["4", "5"], ["4", "4"]), text_cfg).tolist() == [1, 0]
    assert seen == {"prompts": ["q0", "q1"], "completions": ["4", "5"], "solution": ["4", "4"], "id": [0, 1]}

    def positional(p, c):  # parameters with other names still get prompts and completions by position
        return [1.0] * len(c)

    assert call_reward(positional, ["a"], ["b"], answer=["x"]) == [1.0]
    with pytest.raises(RewardError, match="not a number"):
        call_reward(lambda prompts, completions: ["1"], ["a"], ["b"])


# -- group-RL options, by hand -----------------------------------------------------------------

def test_reward_scaling_group_batch_none_by_hand():
    s = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two groups of 3
    g1_mean, g2_mean = 1 / 3, 1.0
    g1_std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    centred = torch.tensor([1 - g1_mean, -g1_mean, -g1_mean, 0, 0, 0])
    batch_std = float(s.std())
    torch.testing.assert_close(losses.group_advantages(s, 3, "grpo", scale="none"), centred)
    torch.testing.assert_close(losses.group_advantages(s, 3, "grpo", scale="batch"), centred / (batch_std + 1e-6))
    torch.testing.assert_close(losses.group_advantages(s, 3, "grpo", scale="group"),
                               torch.cat([centred[:3] / (g1_std + 1e-6), centred[3:] / 1e-6 * 0]))
    # rloo's default stays unscaled: s - mean of the others
    torch.testing.assert_close(losses.group_advantages(s, 3, "rloo"), torch.tensor([1.0, -0.5, -0.5, 0, 0, 0]))
    assert losses.equal_reward_groups(s, 3).tolist() == [False, True]


def test_an_unscored_sample_leaves_its_group():
    nan = float("nan")
    s = torch.tensor([1.0, nan, 0.0, nan, nan, 2.0])
    adv = losses.group_advantages(s, 3, "grpo", scale="none")
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(losses.group_advantages(s, 3, "rloo"), torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0]))
    assert losses.equal_reward_groups(s, 3).tolist() == [False, True]
    assert losses.equal_reward_groups(torch.tensor([nan, nan]), 2).tolist() == [True]


def test_loss_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 5.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the third answer is masked out
    assert float(losses.aggregate(x, m, "token-mean")) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(losses.aggregate(x, m, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    assert float(losses.aggregate(x, m, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(losses.aggregation_units(m, "token-mean")) == 4 and float(losses.aggregation_units(m, "seq-mean-token-sum")) == 2


def test_clip_higher_by_hand():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv, m = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    sym, _ = losses.policy_loss(logp, old, adv, m, clip=0.2)
    high, _ = losses.policy_loss(logp, old, adv, m, clip=0.2, clip_high=0.28)
    assert float(sym) == pytest.approx((-1.2 + 0.8) / 2)   # ratio 1.5 clipped at 1.2; 0.5 -> 0.8 with A<0
    assert float(high) == pytest.approx((-1.28 + 0.8) / 2)


def test_loss_weights_leave_out_unscored_truncated_and_all_equal():
    from align.ppo.experience import loss_weights

    p = load_config("ppo", None, ["ppo.mask_truncated_completions=true"]).ppo
    s = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    assert loss_weights(s, [True, True, False, True], p, False).tolist() == [True, False, False, True]
    p.mask_truncated_completions = False
    assert loss_weights(s, [True, True, False, True], p, False).tolist() == [True, False, True, True]
    assert loss_weights(torch.ones(4), [True] * 4, p, False) is None
    assert not loss_weights(torch.ones(4), [True] * 4, p, True).any()


def test_gae_refuses_sequence_aggregation():
    from align.config import ConfigError
    from align.ppo import check_config

    with pytest.raises(ConfigError, match="ppo.loss_aggregation"):
        check_config(load_config("ppo", None, ["ppo.loss_aggregation=seq-mean-token-sum"]))
    check_config(load_config("ppo", None, ["ppo.loss_aggregation=seq-mean-token-sum", "ppo.advantage=grpo"]))


# -- held-out accuracy ---------------------------------------------------------------------------

def test_accuracy_report_by_hand():
    from align.rollout.base import Completion
    from align.scoring.stats import wilson_ci95
    from align.verifiable import accuracy

    prompts = [{"messages": [{"role": "user", "content": f"q{i}"}], "ids": [i],
                "fields": {"answer": str(i), "difficulty": "easy" if i < 2 else "hard"}} for i in range(4)]
    prompts.append({"messages": [{"role": "user", "content": "no answer"}], "ids": [9], "fields": {}})

    class Engine:  # greedy: right with the number only for 0, right but wordy for 1, wrong after
        def generate(self, ids, params):
            if params.greedy:
                texts = {0: "0", 1: "it is 1", 2: "7", 3: "8"}
                return [Completion(i, [1], True, text=texts[i[0]]) for i in ids]
            return [Completion(i, [1], True, text=str(i[0]) if s % 2 else "x") for i, s in zip(ids, params.row_seeds)]

    report, samples = accuracy(Engine(), prompts, "answer", "difficulty", 8, pass_k=2)
    g = report["greedy"]
    assert (g["n"], g["strict"], g["lenient"]) == (4, 0.25, 0.5) and len(samples) == 4
    assert g["by_difficulty"] == {"easy": {"strict": 0.5, "lenient": 1.0, "n": 2}, "hard": {"strict": 0.0, "lenient": 0.0, "n": 2}}
    assert g["lenient_ci95"] == list(wilson_ci95(2, 4))
    lo, hi = wilson_ci95(2, 4)
    assert lo < 0.5 < hi and wilson_ci95(0, 10)[0] == 0.0
    # pass@2: seeds alternate right/wrong per prompt in this fake, so every prompt is right once
    assert report["pass@2"]["lenient"] == 1.0 and report["pass@2"]["k"] == 2
    assert accuracy(Engine(), prompts[4:], "answer", "difficulty", 8) == (None, [])


def test_pass_at_k_reuses_the_sampled_answers():
    from align.rollout.base import Completion
    from align.verifiable import accuracy

    prompts = [{"messages": [{"role": "user", "content": "q"}], "ids": [i], "fields": {"answer": "1"}} for i in range(3)]
    asked = []

    class Engine:
        def generate(self, ids, params):
            asked.append(len(ids))
            return [Completion(i, [1], True, text="0") for i in ids]

    firsts = [Completion([i], [1], True, text="1" if i == 2 else "0") for i in range(3)]
    report, _ = accuracy(Engine(), prompts, "answer", "difficulty", 8, pass_k=3, first_samples=firsts)
    assert asked == [3, 6]  # greedy for 3 prompts, then k - 1 = 2 more answers each
    assert report["pass@3"]["lenient"] == pytest.approx(1 / 3)  # only the third prompt's first sample was right


def test_paired_difference_by_hand():
    from align.scoring.stats import paired_difference

    a, b = [1, 0, 0, 1, 0], [1, 1, 1, 0, 0]
    d = paired_difference(a, b)
    diffs = [0, 1, 1, -1, 0]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4)
    assert d["difference"] == pytest.approx(0.2) and d["ci95"] == pytest.approx([mean - 1.959964 * sd / math.sqrt(5),
                                                                                mean + 1.959964 * sd / math.sqrt(5)])
    assert (d["only_b_right"], d["only_a_right"], d["n"]) == (2, 1, 5)


def test_ppo_on_the_arithmetic_task_reports_accuracy(tmp_path, tiny_model_path):
    """The built-in task end to end on the tiny model: every evaluation grades the held-out
    answers (regraded here by hand from samples.jsonl), pass@k at the first and the final one,
    groups with equal rewards are skipped and counted, the best evaluation is recorded."""
    from align.ppo import run_ppo
    from align.verifiable import grade

    summary = run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", "data.dataset=arithmetic", "data.rows_stop=64", "data.eval_prompts=8",
        "rollout.max_new_tokens=4", "ppo.iterations=3", "ppo.eval_every=2", "ppo.prompts_per_iteration=2",
        "ppo.samples_per_prompt=2", "ppo.minibatch_size=4", "ppo.advantage=grpo", "ppo.eval_pass_k=2",
        "ppo.skip_equal_reward_groups=true", "reward.function=reward.verify:numeric_match",
        f"run.output_dir={tmp_path}", "run.name=arith", "run.plot=false"]))
    metrics = [json.loads(line) for line in (tmp_path / "arith" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "groups_skipped" in m]
    assert len(train) == 3 and all(0 <= m["groups_skipped"] <= 2 for m in train)
    rows = [json.loads(line) for line in (tmp_path / "arith" / "samples.jsonl").read_text().splitlines()]
    greedy = [r for r in rows if r["split"] == "eval_greedy"]
    assert sorted({r["iteration"] for r in greedy}) == [0, 2, 3] and len(greedy) == 24
    for it in (0, 2, 3):
        mine = [r for r in greedy if r["iteration"] == it]
        marks = grade([r["completion"] for r in mine], [r["answer"] for r in mine])
        ev = next(m for m in metrics if m.get("step") == it and "eval/accuracy_lenient" in m)
        assert ev["eval/accuracy_lenient"] == pytest.approx(sum(marks["lenient"]) / 8)
        assert ev["eval/accuracy_strict"] == pytest.approx(sum(marks["strict"]) / 8)
        assert ("eval/pass@2_lenient" in ev) == (it != 2)  # first and final evaluations only
    assert summary["eval_final"]["accuracy"]["greedy"]["n"] == 8
    assert summary["best_heldout"]["iteration"] in (0, 2, 3)
    assert summary["eval_initial"]["accuracy"]["greedy"]["by_difficulty"].keys() <= {
        "1-digit +", "1-digit *", "2-digit +", "2-digit -"}
    change = summary["accuracy_change"]  # first vs last greedy answers, paired, regraded by hand
    first = [r for r in greedy if r["iteration"] == 0]
    last = [r for r in greedy if r["iteration"] == 3]
    diff = [b["lenient"] - a["lenient"] for a, b in zip(first, last)]
    assert change["lenient"]["difference"] == pytest.approx(sum(diff) / 8) and change["lenient"]["n"] == 8
    assert (change["from_iteration"], change["to_iteration"]) == (0, 3)


def test_greedy_only_evaluation(tmp_path, tiny_model_path):
    """ppo.eval_sampled=false (the smoke run's quicker yardstick): no sampled held-out answers,
    reward or KL -- only the graded greedy answers and their paired change."""
    from align.ppo import run_ppo

    summary = run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", "data.dataset=arithmetic", "data.rows_stop=32",
        "data.eval_dataset=arithmetic-heldout-100", "data.eval_prompts=0", "rollout.max_new_tokens=3",
        "ppo.iterations=1", "ppo.prompts_per_iteration=2", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4",
        "ppo.advantage=grpo", "ppo.eval_sampled=false", "reward.function=reward.verify:numeric_match",
        f"run.output_dir={tmp_path}", "run.name=g", "run.plot=false"]))
    rows = [json.loads(line) for line in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    splits = {r["split"] for r in rows}
    assert "eval_greedy" in splits and "eval" not in splits  # no sampled held-out answers
    assert "reward_mean" not in summary["eval_final"] and "reward_gain_in_initial_std" not in summary
    assert summary["eval_final"]["accuracy"]["greedy"]["n"] == 100
    kinds = summary["eval_final"]["accuracy"]["greedy"]["by_difficulty"]
    assert {k: v["n"] for k, v in kinds.items()} == {"1-digit +": 25, "1-digit *": 25, "2-digit +": 25, "2-digit -": 25}
    assert summary["accuracy_change"]["lenient"]["n"] == 100


@pytest.mark.real
@pytest.mark.vllm
def test_align_eval_accuracy_of_base_and_adapter(real_model, tmp_path):
    """`align eval --accuracy`: an untrained adapter (LoRA B = 0) answers as the base does, so
    their paired difference is exactly 0; the base gets some one-digit sums right."""
    import copy

    from align.adapters import save_adapter
    from align.config import LoraConfig
    from align.evaluation import run_eval
    from align.models import add_policy_adapter

    base, _ = real_model
    save_adapter(add_policy_adapter(copy.deepcopy(base), LoraConfig(r=4)), tmp_path / "zero" / "adapter",
                 "HuggingFaceTB/SmolLM2-135M-Instruct")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}? Answer with the number only.",
                                        "answer": str(a + b), "difficulty": "1-digit +"}) + "\n"
                            for a, b in [(3, 7), (7, 4), (4, 1), (8, 2), (2, 2), (5, 3)]))
    res = run_eval([str(tmp_path / "zero" / "adapter")], accuracy=str(held), max_new_tokens=12,
                   out=str(tmp_path / "out"))["accuracy"]
    assert res["n"] == 6 and set(res["models"]) == {"base", "adapter"}
    assert res["models"]["base"]["lenient"] > 0
    assert res["models"]["adapter"]["vs_base"]["lenient"]["difference"] == 0
    answers = [json.loads(line) for line in (tmp_path / "out" / "accuracy_answers.jsonl").read_text().splitlines()]
    assert [a["base"]["completion"] for a in answers] == [a["adapter"]["completion"] for a in answers]
    assert "Accuracy" in (tmp_path / "out" / "report.html").read_text()


def test_side_by_side_leaves_unscored_pairs_out(tmp_path):
    """A held-out answer the reward did not score (None -> NaN) is not a loss for the policy: the
    win rate is over the pairs scored on both sides."""
    from align.ppo.heldout import side_by_side

    nan = float("nan")
    rows = [(0, 1.0), (0, 0.0), (0, nan), (3, 1.0), (3, 1.0), (3, 0.0)]  # (iteration, reward)
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"split": "eval", "iteration": it, "prompt": f"p{i % 3}", "completion": "c",
                                        "tokens": 2, "reward": r}) + "\n" for i, (it, r) in enumerate(rows)))
    out = side_by_side(path, tmp_path / "sbs.jsonl")
    assert out["prompts"] == 3 and out["reward_win_rate"] == pytest.approx(0.75)  # a tie and a win; the NaN pair is out
    assert out["reward_mean_base"] == pytest.approx(0.5)


def test_a_users_solution_dataset_runs_with_trls_accuracy_reward(tmp_path, tiny_model_path):
    """The issue's user: their own JSONL with a `solution` field, TRL's accuracy_reward passed
    unchanged (conversational completions); references math-verify cannot parse give None,
    which is logged as unscored, not an error."""
    from align.ppo import run_ppo

    rows = tmp_path / "mine.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "solution": f"${i + 1}$" if i % 2 else "\\frac{"})
                            + "\n" for i in range(12)))
    run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", f"data.dataset={rows}", "data.eval_prompts=2", "data.answer_field=solution",
        "rollout.max_new_tokens=4", "ppo.iterations=1", "ppo.prompts_per_iteration=2", "ppo.samples_per_prompt=2",
        "ppo.minibatch_size=4", "ppo.advantage=grpo", "reward.function=trl.rewards:accuracy_reward",
        "reward.completions=messages", f"run.output_dir={tmp_path}", "run.name=mine", "run.plot=false"]))
    metrics = [json.loads(line) for line in (tmp_path / "mine" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "unscored" in m and "reward_mean" in m]
    assert train and all(m["unscored"] in (0, 2, 4) for m in train)  # whole prompts with an unparsable solution
    evals = [m for m in metrics if "eval/unscored" in m]
    assert evals and all("eval/accuracy_lenient" in m for m in evals)
