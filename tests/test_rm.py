"""`align rm` on a tiny model (logic), and the learned sentiment reward on real IMDB data."""
import json

import pytest

from align.config import load_config


def test_tiny_rm_job(tmp_path, tiny_model_path, shared):
    from align.rm import run_rm

    cfg = load_config("rm", "configs/rm_hh_rlhf.yaml", [
        f"model.name={tiny_model_path}", "data.max_train_pairs=16", "data.max_eval_pairs=8",
        "train.batch_size=4", "train.max_length=2048", f"run.output_dir={tmp_path}", "run.name=rm"])
    summary = run_rm(cfg)
    run = tmp_path / "rm"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert summary["eval"]["pairs"] == 8 and 0 <= summary["eval"]["pairwise_accuracy"] <= 1
    steps = sum("loss" in json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines())
    assert steps == -(-summary["train_pairs"] // 4) and summary["train_pairs"] + summary["dropped_too_long"] == 16


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
