"""`align rm` on a tiny model (logic), and the learned sentiment reward on real IMDB data."""
import json

import pytest

from align.config import load_config


def test_tiny_rm_job(tmp_path, tiny_model_path, shared):
    """`align rm` on packed pairs: a SEQ_CLS adapter plain transformers + PEFT load, validation and
    full-length held-out accuracy, and the loss falls on the pairs it trains on."""
    from align.rm import run_rm

    cfg = load_config("rm", "configs/rm_hh_rlhf.yaml", [
        f"model.name={tiny_model_path}", "data.max_train_pairs=24", "data.max_eval_pairs=8",
        "data.validation_pairs=4", "train.batch_size=4", "train.epochs=3", "train.learning_rate=3e-3",
        "train.max_length=96", "train.max_prompt_length=48", f"run.output_dir={tmp_path}", "run.name=rm"])
    summary = run_rm(cfg)
    run = tmp_path / "rm"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert summary["eval"]["pairs"] == 8 and summary["eval"]["max_length"] == "untruncated"
    assert summary["validation"]["pairs"] == 4 and summary["train_pairs"] == 20
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 15 and losses[0] == pytest.approx(0.6931, abs=1e-3)  # 20/4 x 3; ties at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 0.02, losses  # it learns its training pairs
    assert "accuracy" in logs[0] and summary["seconds_per_1000_pairs"] > 0


def test_packed_reward_scores_equal_the_plain_classifier(tiny_model_path):
    """One packed row per pair scores exactly what transformers' sequence classifier scores on
    each conversation alone (its last token), also in the two-row fallback."""
    import torch

    from align.chat import chat_text, tokenize_pair
    from align.config import LoraConfig, ModelConfig
    from align.scoring.pairs import PackedPairCollator
    from align.rm import new_reward_model
    from align.scoring.pairs import pair_scores

    model, tok = new_reward_model(ModelConfig(name=tiny_model_path), LoraConfig(r=4))
    torch.manual_seed(0)
    for n, w in model.named_parameters():
        if "lora_B" in n or "score" in n:
            w.data.normal_(0, 0.3)
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello, friend!"}],
             "rejected": [{"role": "assistant", "content": "Go."}]},
            {"prompt": [{"role": "user", "content": "Tell me about bread, please."}],
             "chosen": [{"role": "assistant", "content": "Flour."}],
             "rejected": [{"role": "assistant", "content": "It is baked from flour, water and yeast."}]}]
    got = pair_scores(model, [tokenize_pair(tok, r) for r in rows], PackedPairCollator(tok.pad_token_id, 512, 256))
    with torch.no_grad():
        want = torch.tensor([[float(model(**tok(chat_text(tok, r["prompt"] + r[k]), return_tensors="pt",
                                                 add_special_tokens=False)).logits[0, 0]) for k in ("chosen", "rejected")]
                             for r in rows])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.get_base_model().config._attn_implementation = "flex_attention"  # no 4-D masks: two rows per pair
    torch.testing.assert_close(pair_scores(model, [tokenize_pair(tok, r) for r in rows],
                                           PackedPairCollator(tok.pad_token_id, 512, 256)), want, atol=1e-4, rtol=1e-4)


@pytest.mark.real
def test_sentiment_reward_separates_real_reviews(shared):
    """The demo's custom reward: fitted on IMDB rows 0-959, checked on rows 960-1199."""
    from reward.sentiment import _scorer, positive_probability, positive_sentiment

    scorer = _scorer()
    assert scorer.heldout_accuracy > 0.75, scorer.heldout_accuracy
    good, bad = positive_sentiment([], ["A wonderful, moving film with superb acting.",
                                        "Dull, boring and a complete waste of time."])
    assert good > 0 > bad
    p = positive_probability([], ["I loved it."])[0]
    assert 0.5 < p < 1.0
