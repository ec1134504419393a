"""DPO: packed scoring is exact, the reference is the disabled adapter, ties count half,
and a short real run on real HH-RLHF pairs lowers the loss and writes the adapter."""
import copy
import json

import pytest
import torch

from align.config import ConfigError, LoraConfig, load_config
from align.scoring.stats import tie_half_accuracy
from align.scoring.pairs import (PACKED_KEYS, PackedPairCollator, PairScores, implicit_reward_metrics,
                                 install_packed_forward, reference_free_accuracy, truncate_pair)
from align.models import add_policy_adapter, live_copies, reference_mode

EXAMPLES = [
    {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13]},
    {"prompt_ids": [20, 21], "chosen_ids": [22], "rejected_ids": [23, 24, 25, 26]},
    {"prompt_ids": [30, 31, 32], "chosen_ids": [33, 34], "rejected_ids": [35, 36]},
]


@pytest.fixture()
def policy(tiny_model):
    base, tok = tiny_model
    model = add_policy_adapter(copy.deepcopy(base), LoraConfig(r=4))
    torch.manual_seed(1)
    for n, w in model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.2)  # a trained-looking adapter, so "adapter off" is a real change
    install_packed_forward(model.get_base_model())
    return model, tok


def _packed_and_plain(model, tok):
    batch = PackedPairCollator(pad_token_id=tok.pad_token_id)(EXAMPLES)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=labels, fused_lm_head=True, **{k: batch[k] for k in PACKED_KEYS})
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    plain = plain * (labels[:, 1:] != -100)
    return packed.log_probs, plain


def test_packed_pairs_match_separate_rows(policy):
    model, tok = policy
    packed, plain = _packed_and_plain(model, tok)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    with reference_mode(model):
        packed_ref, plain_ref = _packed_and_plain(model, tok)
    torch.testing.assert_close(packed_ref, plain_ref, atol=1e-5, rtol=1e-5)
    assert (packed - packed_ref).abs().max() > 1e-3  # the adapter really changes the scores


def test_a_pairs_answer_ends_are_the_same_token_in_both_layouts():
    """Where a reward model reads each answer (its last token) is the same token in the packed row
    and in the answer's own row -- an empty answer's included: it reads the prompt's last token,
    not the chosen answer's last one (which an empty rejected answer once did, packed)."""
    pairs = EXAMPLES + [{"prompt_ids": [40, 41, 42], "chosen_ids": [43, 44], "rejected_ids": []}]
    batch = PackedPairCollator(pad_token_id=0)(pairs)
    B = len(pairs)
    for i in range(B):
        for j in range(2):
            row, packed = batch["input_ids"][i + j * B], batch["packed_input_ids"][i]
            assert row[batch["row_ends"][i, j]] == packed[batch["packed_ends"][i, j]]
            assert batch["packed_position_ids"][i, batch["packed_ends"][i, j]] == batch["row_ends"][i, j]
    assert batch["row_ends"][-1].tolist() == [4, 2] and batch["packed_ends"][-1].tolist() == [4, 2]


def test_reference_is_base_with_adapter_off(policy, tiny_model):
    model, tok = policy
    base, _ = tiny_model
    copies = live_copies(model.get_input_embeddings().weight)  # the fixtures' bases, this process-wide
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), reference_mode(model):
        ref_logits = model(input_ids=ids).logits
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        policy_logits = model(input_ids=ids).logits
    assert torch.equal(ref_logits, base_logits)
    assert not torch.equal(policy_logits, base_logits)
    assert live_copies(model.get_input_embeddings().weight) == copies  # the reference copied nothing


def test_truncation_keeps_prompt_end_and_answer_start():
    p, c, r = truncate_pair(list(range(10)), [100, 101, 102], [200, 201], max_length=8, max_prompt_length=6)
    assert p == [4, 5, 6, 7, 8, 9] and c == [100, 101] and r == [200, 201]


def test_ties_count_half():
    assert tie_half_accuracy(torch.tensor([1.0, 0.0, -1.0, 0.0])) == 0.5
    assert tie_half_accuracy(torch.tensor([2.0, 0.0])) == 0.75
    same = PairScores(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]),
                      torch.tensor([3.0, 5.0]), torch.tensor([2.0, 2.0]))
    # an unchanged policy: every pair is a tie -> exactly 0.5, margin 0
    m = implicit_reward_metrics(same, same, beta=0.1)
    assert m["implicit_accuracy"] == 0.5 and m["mean_margin"] == 0.0
    # mean per-token: pair 0 -1.0 vs -2.0 (chosen wins), pair 1 -1.0 vs -1.0 (tie)
    assert reference_free_accuracy(same) == 0.75


def test_tiny_dpo_job_end_to_end(tmp_path, tiny_model_path, shared, implicit_margins_by_hand):
    """The whole `align dpo` job on a tiny model: run folder, adapter, metrics, eval, plot."""
    from align.dpo import run_dpo

    cfg = load_config("dpo", "configs/dpo_hh_rlhf.yaml", [
        f"model.name={tiny_model_path}", "data.max_train_pairs=16", "data.max_eval_pairs=8",
        "train.batch_size=4", "train.max_length=96", "train.max_prompt_length=48",
        f"run.output_dir={tmp_path}", "run.name=tiny"])
    summary = run_dpo(cfg)
    run = tmp_path / "tiny"
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "summary.json", "plots.png",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    assert adapter_cfg["base_model_name_or_path"] == tiny_model_path
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in s for s in steps) == 4
    ev = summary["eval"]
    from conftest import accuracy_with_ties

    from align.data import load_preference_splits

    _, eval_rows, _ = load_preference_splits(cfg.data)  # the held-out pairs the run evaluated
    margins = implicit_margins_by_hand(tiny_model_path, run / "adapter", eval_rows, cfg.train.beta, 96, 48)
    assert ev["pairs"] == 8 and ev["implicit_accuracy"] == pytest.approx(accuracy_with_ties(margins))
    # the compute report counts what the packed rows really hold
    cut, c = summary["truncation"], summary["compute"]
    assert 0 < cut["answer_tokens"] < cut["packed_tokens"] <= 16 * 2 * 96
    fwd = 2 * c["backbone_params"] * cut["packed_tokens"] + 2 * c["lm_head_params"] * cut["answer_tokens"]
    assert fwd > 0 and c["phases"]["train"]["gflop"] == pytest.approx(2 * fwd / 1e9, abs=1e-3)
    assert set(c["phases"]) == {"reference_train", "train", "reference_eval", "policy_eval"}


@pytest.mark.real
def test_real_dpo_lowers_loss_and_writes_adapter(real_dpo_run):
    """Real SmolLM2-135M on 8 real HH-RLHF pairs, 3 passes: the DPO loss must fall."""
    losses = [json.loads(l)["loss"] for l in (real_dpo_run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    assert len(losses) == 3
    assert losses[0] == pytest.approx(0.6931, abs=2e-3)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.02, losses
    assert (real_dpo_run / "adapter" / "adapter_model.safetensors").stat().st_size > 1000


def test_score_pairs_in_dataset_order(policy):
    """Scoring sorts by length for batching; results must come back in dataset order."""
    from align.scoring.pairs import score_pairs

    model, tok = policy
    packed, plain = _packed_and_plain(model, tok)
    B = len(EXAMPLES)
    scores = score_pairs(model, EXAMPLES, PackedPairCollator(pad_token_id=tok.pad_token_id), batch_size=2)
    torch.testing.assert_close(scores.chosen_logp, plain.sum(1)[:B], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores.rejected_logp, plain.sum(1)[B:], atol=1e-4, rtol=1e-5)
    assert scores.chosen_tokens.tolist() == [3, 1, 2] and scores.rejected_tokens.tolist() == [2, 4, 2]


def test_trainer_holds_no_reference_model(tiny_model_path, tmp_path):
    """TRL must take the reference from the disabled adapter: no second model object, one base copy."""
    import datasets

    from align.config import ModelConfig
    from align.dpo.trainer import PackedDPOTrainer, dpo_args
    from align.models import load_base

    cfg = load_config("dpo", None, [f"model.name={tiny_model_path}", "train.max_steps=1"])
    base, tok = load_base(ModelConfig(name=tiny_model_path))
    copies = live_copies(base.get_input_embeddings().weight)  # this base + any the session holds
    model = add_policy_adapter(base, cfg.lora)
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                                      "chosen": [{"role": "assistant", "content": "hello"}],
                                      "rejected": [{"role": "assistant", "content": "go"}]}] * 4)
    trainer = PackedDPOTrainer(model=model, args=dpo_args(cfg, str(tmp_path)), train_dataset=ds,
                               processing_class=tok, max_length=64, max_prompt_length=32)
    assert trainer.ref_model is None
    # process-wide: a reference model TRL loaded (or deep-copied) anywhere would be one more
    assert live_copies(base.get_input_embeddings().weight) == copies


def test_one_pair_tokenization_for_dpo_rm_and_eval(real_model_path):
    """DPO trains on TRL's tokenization; its held-out pairs, `align rm` and `align eval` use
    chat.tokenize_pair: the two split every pair at the same place -- plain text (tokens merging
    across the boundary, an answer that already ends with EOS) and chat messages."""
    import types

    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from align.chat import tokenize_pair

    tok = AutoTokenizer.from_pretrained(real_model_path)
    user = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    bot = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    rows = [
        {"prompt": "Answer: ", "chosen": "yes", "rejected": "no, never"},     # " yes" is one token
        {"prompt": "Say hi", "chosen": " hi" + tok.eos_token, "rejected": "\nno"},
        {"prompt": "The capital of France is", "chosen": " Paris", "rejected": "Paris."},
        {"prompt": user("Hi?") + bot("Hello.") + user("Sum 2 and 3."), "chosen": bot("5"), "rejected": bot("six")},
    ]
    args = DPOConfig(output_dir=".", use_cpu=True, bf16=False)
    trl = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), datasets.Dataset.from_list(rows[:3]),
                                      tok, args, "plain")
    trl_chat = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), datasets.Dataset.from_list(rows[3:]),
                                           tok, args, "chat")
    for row, theirs in zip(rows, list(trl) + list(trl_chat)):
        ours = tokenize_pair(tok, row)
        assert {k: list(theirs[k]) for k in ours} == ours, row
    merged = tokenize_pair(tok, rows[0])
    assert tok.decode(merged["chosen_ids"]).startswith(" yes") and merged["chosen_ids"][-1] == tok.eos_token_id
    assert tokenize_pair(tok, rows[1])["chosen_ids"].count(tok.eos_token_id) == 1


def _first_losses(tiny_model_path, tmp_path, name: str, *extra) -> list[float]:
    from align.dpo import run_dpo

    run_dpo(load_config("dpo", None, [
        f"model.name={tiny_model_path}", "data.max_train_pairs=8", "evaluate=false", "train.batch_size=4",
        "train.max_length=64", "train.max_prompt_length=32", f"run.output_dir={tmp_path}", f"run.name={name}",
        "run.save_every=0", "run.plot=false", *extra]))
    return [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(l)]


def test_trls_other_losses_and_a_weighted_list_train_through_the_packed_trainer(tiny_model_path, tmp_path, shared):
    """TRL 1.16's 15 DPO losses are all choices (the three added here run through align's packed
    forward), and a list of them is summed with train.loss_weights (RPO: sigmoid + sft). At the
    first step the policy is the reference (margin 0), so each loss has a closed form there."""
    import math

    with pytest.raises(ConfigError, match="train.label_smoothing' must be > 0 with the exo_pair loss"):
        load_config("dpo", None, ["train.loss_type=exo_pair"])
    exo = _first_losses(tiny_model_path, tmp_path, "exo", "train.loss_type=exo_pair", "train.label_smoothing=0.001")
    eps = 0.001  # q = (1/2, 1/2) against p = (1 - eps, eps): KL = 1/2 ln(1/2 / (1-eps)) + 1/2 ln(1/2 / eps)
    assert exo[0] == pytest.approx(0.5 * math.log(0.5 / (1 - eps)) + 0.5 * math.log(0.5 / eps), abs=1e-3)
    norm = _first_losses(tiny_model_path, tmp_path, "norm", "train.loss_type=sigmoid_norm")
    assert norm[0] == pytest.approx(math.log(2), abs=1e-3)
    sft = _first_losses(tiny_model_path, tmp_path, "sft", "train.loss_type=sft")
    assert sft[0] > 2  # the chosen answers' NLL under a random tiny model, not a preference loss
    both = _first_losses(tiny_model_path, tmp_path, "both", "train.loss_type=[sigmoid,sft]",
                         "train.loss_weights=[1.0,0.5]")
    assert both[0] == pytest.approx(math.log(2) + 0.5 * sft[0], rel=1e-4)
    assert all(len(x) == 2 and all(math.isfinite(v) for v in x) for x in (exo, norm, sft, both))


def test_normalized_margin_accuracy_by_hand():
    """(pi - ref) per token, chosen against rejected: the longer answer's larger summed log-ratio
    does not decide (pair 0: summed margin +1, per-token margin -0.1)."""
    from align.scoring.pairs import PairScores, implicit_reward_metrics, normalized_margin_accuracy

    ref = PairScores(torch.tensor([-10.0, -10.0, -5.0]), torch.tensor([-10.0, -10.0, -5.0]),
                     torch.tensor([10, 2, 1]), torch.tensor([2, 2, 1]))
    pol = PairScores(torch.tensor([-8.0, -9.0, -5.0]), torch.tensor([-9.0, -10.0, -5.0]),
                     torch.tensor([10, 2, 1]), torch.tensor([2, 2, 1]))
    # per-token gains: pair 0 chosen 0.2, rejected 0.5 (lose); pair 1 0.5 vs 0 (win); pair 2 tie
    assert normalized_margin_accuracy(pol, ref) == pytest.approx((0 + 1 + 0.5) / 3)
    assert implicit_reward_metrics(pol, ref, 1.0)["implicit_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_dpo_reports_an_in_family_validation_split(tiny_model_path, tmp_path, shared):
    """data.validation_pairs holds pairs of the training subsets out of training and reports them
    beside the off-family evaluation (validation.json, summary['validation'])."""
    from align.dpo import run_dpo

    summary = run_dpo(load_config("dpo", None, [
        f"model.name={tiny_model_path}", "data.max_train_pairs=12", "data.max_eval_pairs=4", "data.validation_pairs=4",
        "train.batch_size=4", "train.max_length=64", "train.max_prompt_length=32", f"run.output_dir={tmp_path}",
        "run.name=v", "run.save_every=0", "run.plot=false"]))
    assert summary["train_pairs"] == 8 and summary["steps"] == 2
    val = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert val["pairs"] == 4 and val["held_out_of"] == ["helpful-rejection-sampled"] and summary["validation"] == val
    assert 0 <= val["normalized_margin_accuracy"] <= 1 and "normalized_margin_accuracy" in summary["eval"]
    assert (tmp_path / "v" / "reference_logps_validation.pt").is_file()
    for split, result in (("validation", val), ("eval", summary["eval"])):
        marks = json.loads((tmp_path / "v" / f"{split}_per_pair.json").read_text())
        assert len(marks["normalized"]) == result["pairs"] == len(marks["implicit"])
        assert sum(marks["normalized"]) / result["pairs"] == pytest.approx(result["normalized_margin_accuracy"])
        assert sum(marks["implicit"]) / result["pairs"] == pytest.approx(result["implicit_accuracy"])
        assert sum(marks["reference_free_normalized"]) / result["pairs"] == pytest.approx(
            result["reference_free_accuracy_policy"])


def test_held_out_pairs_are_truncated_as_train_eval_max_length_says():
    from align.config import DPOTrainConfig
    from align.dpo import eval_collator
    from align.scoring.pairs import NO_LIMIT

    t = DPOTrainConfig(max_length=128, max_prompt_length=64)
    as_training = eval_collator(t, 0)
    assert (as_training.max_length, as_training.max_prompt_length) == (128, 64)
    t.eval_max_length = 0
    assert eval_collator(t, 0).max_length == NO_LIMIT
    t.eval_max_length = 256
    assert (eval_collator(t, 0).max_length, eval_collator(t, 0).max_prompt_length) == (256, 128)
