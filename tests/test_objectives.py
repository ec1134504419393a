"""The reference-free preference objectives (align/dpo/objectives.py): each equals its closed
form on fixed log-probabilities, TRL's own implementation (trl.experimental) on the same numbers,
and not the loss it could be swapped with; a reference-free run makes no reference pass."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from align.dpo.objectives import objective_loss, orpo, simpo

# two pairs: summed log-probs and answer lengths
CHOSEN, REJECTED = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -4.0])
C_TOK, R_TOK = torch.tensor([2, 3]), torch.tensor([3, 2])
AVG_C, AVG_R = [-2.0, -3.0], [-2.0, -2.0]  # per-token averages, by hand


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_simpo_is_its_closed_form_and_trls():
    beta, ratio, eps = 2.0, 0.5, 0.1
    loss, m = simpo(CHOSEN, REJECTED, C_TOK, R_TOK, beta, ratio, eps)
    logits = [beta * (c - r - ratio) for c, r in zip(AVG_C, AVG_R)]  # -1, -3
    expected = sum(-(1 - eps) * _logsig(z) - eps * _logsig(-z) for z in logits) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert m["chosen_rewards"].tolist() == pytest.approx([beta * c for c in AVG_C])
    from trl.experimental.cpo import CPOTrainer  # the same formula in TRL (simpo_gamma = ratio x beta)

    trl_self = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=ratio * beta, label_smoothing=eps,
                               accelerator=SimpleNamespace(device="cpu"))
    trl_losses, _, _ = CPOTrainer.cpo_loss(trl_self, CHOSEN / C_TOK, REJECTED / R_TOK)
    assert float(trl_losses.mean()) == pytest.approx(float(loss), rel=1e-6)
    # not the sums (SimPO without its length normalisation) nor DPO's sigmoid without the margin
    assert float(simpo(CHOSEN, REJECTED, torch.ones(2), torch.ones(2), beta, ratio, eps)[0]) != pytest.approx(expected)
    assert float(simpo(CHOSEN, REJECTED, C_TOK, R_TOK, beta, 0.0, eps)[0]) != pytest.approx(expected)


def test_orpo_is_its_closed_form_and_trls():
    lam = 0.1
    loss, m = orpo(CHOSEN, REJECTED, C_TOK, R_TOK, lam)
    nll = (4.0 + 9.0) / 5  # the chosen answers' tokens: 13 nats over 5 tokens
    odds = [(c - r) - (math.log1p(-math.exp(c)) - math.log1p(-math.exp(r))) for c, r in zip(AVG_C, AVG_R)]
    expected = nll - lam * sum(_logsig(o) for o in odds) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["nll_loss"]) == pytest.approx(nll)
    from trl.experimental.orpo import ORPOTrainer

    trl_self = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    trl_losses = ORPOTrainer.odds_ratio_loss(trl_self, CHOSEN / C_TOK, REJECTED / R_TOK)[0]
    assert nll - float(trl_losses.mean()) == pytest.approx(float(loss), rel=1e-6)
    assert float(orpo(CHOSEN, REJECTED, C_TOK, R_TOK, 0.0)[0]) != pytest.approx(expected)  # the NLL alone


def test_an_unknown_objective_is_named():
    with pytest.raises(ValueError, match="no objective 'kto2'"):
        objective_loss("kto2", CHOSEN, REJECTED, C_TOK, R_TOK, SimpleNamespace(beta=1.0))


def test_a_reference_free_run_makes_no_reference_pass(tmp_path, tiny_model_path, shared):
    import subprocess
    import sys

    args = ["dpo", f"model.name={tiny_model_path}", "data.max_train_pairs=8", "data.max_eval_pairs=4",
            "train.max_length=64", "train.max_prompt_length=32", "train.batch_size=4", f"run.output_dir={tmp_path}",
            "run.name=s", "run.plot=false", "model.dtype=float32", "train.objective=simpo", "train.beta=2.0"]
    out = subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "s"
    assert not (run / "reference_logps_train.pt").exists()  # a DPO run caches it here
    assert (run / "reference_logps_eval.pt").exists()  # the held-out yardstick still compares with the base
    summary = json.loads((run / "summary.json").read_text())
    assert "reference_train" not in summary["compute"]["phases"] and "train" in summary["compute"]["phases"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r for r in logged)
    assert "normalized_margin_accuracy" in summary["eval"]


def test_kto_is_its_closed_form():
    from align.dpo.objectives import kl_estimate, kto

    logps, ref = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.0, -2.5])  # r = 1, -1, 0.5
    desirable = torch.tensor([True, False, False])
    kl = kl_estimate(torch.tensor([-7.0, -6.0]), torch.tensor([-7.5, -6.3]))  # mean(0.5, 0.3) = 0.4
    assert float(kl) == pytest.approx(0.4)
    beta, wd, wu = 0.5, 1.0, 1.5
    loss, m = kto(logps, ref, desirable, kl, beta, wd, wu)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (wd * (1 - sig(beta * (1 - 0.4))) + wu * (1 - sig(beta * (0.4 + 1))) + wu * (1 - sig(beta * (0.4 - 0.5)))) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert m["chosen_rewards"].tolist() == pytest.approx([0.5]) and m["rejected_rewards"].tolist() == pytest.approx([-0.5, 0.25])
    # not APO-zero's unpaired form (no reference point), nor the labels read the other way round
    assert float(kto(logps, ref, desirable, torch.tensor(0.0), beta, wd, wu)[0]) != pytest.approx(expected)
    assert float(kto(logps, ref, ~desirable, kl, beta, wd, wu)[0]) != pytest.approx(expected)


def test_pairs_become_trls_unpaired_kto_rows_with_mismatched_answers():
    from align.dpo.objectives import kto_rows

    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": f"good {i}"}],
              "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(5)]
    rows = kto_rows(pairs, seed=3)
    assert rows == kto_rows(pairs, seed=3) and rows != kto_rows(pairs, seed=4)
    assert len(rows) == 10 and sum(r["label"] for r in rows) == 5  # both answers of every pair
    for r in rows:  # TRL's KTO columns; the answer a thumbs up or down for its own prompt
        assert {"prompt", "completion", "label"} <= set(r)
        i = r["prompt"][0]["content"][1:]
        assert r["completion"][0]["content"] == ("good " if r["label"] else "bad ") + i
        assert not r["mismatched"][0]["content"].endswith(f" {i}")  # another prompt's answer
    from trl.data_utils import is_conversational

    assert is_conversational({k: rows[0][k] for k in ("prompt", "completion")})
    with pytest.raises(ValueError, match="at least 2 training pairs"):
        kto_rows(pairs[:1], seed=0)


def test_a_kto_run_trains_on_both_answers_of_every_pair(tmp_path, tiny_model_path, shared):
    import subprocess
    import sys

    args = ["dpo", f"model.name={tiny_model_path}", "data.max_train_pairs=8", "data.max_eval_pairs=4",
            "train.max_length=64", "train.max_prompt_length=32", "train.batch_size=4", f"run.output_dir={tmp_path}",
            "run.name=k", "run.plot=false", "model.dtype=float32", "train.objective=kto"]
    out = subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "k"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4  # 8 pairs -> 16 rows, 4 per step
    assert (run / "reference_logps_train.pt").exists()  # KTO measures against the reference
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["loss"] == pytest.approx(0.5)  # 1 - sigmoid(0): the policy starts as the reference
    assert any("kl" in r for r in logged) and "normalized_margin_accuracy" in summary["eval"]
