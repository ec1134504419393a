"""`lora.r: full`: full fine-tuning as a mode of align ppo -- the whole model trains, the
reference is a frozen copy, the run saves model/ -- and what it refuses."""
import json

import pytest
import torch

from align.config import ConfigError, load_config

ARITH = ["data.dataset=arithmetic", "data.rows_stop=32", "data.eval_dataset=arithmetic-heldout-100",
         "data.eval_prompts=0", "rollout.max_new_tokens=3", "rollout.engine=hf", "ppo.prompts_per_iteration=2",
         "ppo.samples_per_prompt=2", "ppo.minibatch_size=4", "ppo.advantage=grpo", "ppo.eval_sampled=false",
         "reward.function=reward.verify:numeric_match", "run.plot=false"]


@pytest.mark.parametrize("extra,key", [
    (["ppo.advantage=gae"], "ppo.advantage"),
    (["reward.kind=classifier", "reward.adapter=runs/x"], "reward.kind"),
    (["judge.kind=dpo", "judge.adapter=runs/x"], "judge.kind"),
    (["rollout.engine=vllm"], "rollout.engine"),
])
def test_full_finetuning_refuses_what_needs_a_fixed_base(extra, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config("ppo", None, [*ARITH, "lora.r=full", *extra])


@pytest.mark.parametrize("job", ["dpo", "rm"])
def test_full_is_a_mode_of_ppo_only(job):
    with pytest.raises(ConfigError, match="key 'lora.r' is full .* align ppo only"):
        load_config(job, None, ["lora.r=full"])


def test_a_rank_is_a_number_or_full():
    with pytest.raises(ConfigError, match="key 'lora.r' must be a rank .* or full, got 'fll'"):
        load_config("ppo", None, ["lora.r=fll"])
    assert load_config("ppo", None, [*ARITH, "lora.r=full"]).lora.r == "full"


def test_full_finetuning_trains_every_weight_against_a_frozen_copy(tiny_model):
    from align.ppo.actor_critic import FullFineTuning

    base = __import__("copy").deepcopy(tiny_model[0])
    ac = FullFineTuning(base)
    n = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in ac.policy_parameters()) == n and all(p.requires_grad for p in ac.policy_parameters())
    assert not any(p.requires_grad for p in ac.reference.parameters())
    assert ac.reference.lm_head.weight.data_ptr() != base.lm_head.weight.data_ptr()  # a copy, not a view
    with torch.no_grad():
        base.lm_head.weight.add_(0.5)  # the policy moves ...
    ids = torch.tensor([[1, 2, 3, 4]])
    with ac.role("reference"):
        ref = ac.lm()(ids).logits
    pol = ac.lm()(ids).logits  # ... the reference does not
    assert not torch.allclose(ref, pol)
    assert ac.train().reference.training is False
    assert set(ac.trained_state()) == {f"model.{k}" for k, _ in base.named_parameters()}
    with pytest.raises(ValueError, match="no adapter roles"):
        ac.add_scorer("rm", "runs/x")


def test_a_full_finetuning_run_saves_and_resolves_a_model(tmp_path, tiny_model_path):
    from safetensors.torch import load_file

    from align.artifacts import resolve
    from align.ppo import run_ppo

    summary = run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", *ARITH, "lora.r=full", "ppo.iterations=2", "ppo.learning_rate=1e-3",
        "reward.function=reward.examples:length_target", "rollout.max_new_tokens=8",
        "ppo.eval_every=0", f"run.output_dir={tmp_path}", "run.name=full", "run.save_every=1"]))
    run = tmp_path / "full"
    assert summary["adapter"] == str(run / "model") and not (run / "adapter").exists()
    trained = load_file(str(run / "model" / "model.safetensors"))
    before = load_file(str(next(__import__("pathlib").Path(tiny_model_path).glob("*.safetensors"))))
    moved = [k for k in before if k in trained and not torch.equal(before[k], trained[k])]
    assert len(moved) > len(before) // 2  # not an adapter: the base's own weights moved
    art = resolve(run)
    assert (art.kind, art.path, art.job) == ("merged", run / "model", "ppo")
    from align.export import ExportError, export

    with pytest.raises(ExportError, match="is a full fine-tuning run .* a transformers model folder already"):
        export(str(run), str(tmp_path / "exp"), verify=False)
    step = resolve(run, checkpoint="1")
    assert step.path == run / "checkpoints" / "step-1" / "model"
    kl = [json.loads(line)["kl_per_answer"] for line in (run / "metrics.jsonl").read_text().splitlines()
          if "kl_per_answer" in line]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] != 0.0  # the reference stayed the base


def test_full_finetuning_is_refused_where_memory_would_not_hold_it(tmp_path, tiny_model_path, monkeypatch):
    import align.memory
    from align.ppo import run_ppo

    monkeypatch.setattr(align.memory, "available_bytes", lambda device: 1000)
    with pytest.raises(ConfigError, match="key 'lora.r': full fine-tuning of .* needs ~.* GiB more"):
        run_ppo(load_config("ppo", None, [f"model.name={tiny_model_path}", *ARITH, "lora.r=full", "ppo.iterations=1",
                                          f"run.output_dir={tmp_path}", "run.name=nomem"]))
    assert not (tmp_path / "nomem").exists()  # refused before anything of the run was kept


def test_without_the_initial_evaluation(tmp_path, tiny_model_path):
    """ppo.eval_at_start=false: no iteration-0 numbers; the summary, the printed report and an
    export's card say only what was measured."""
    from align.export import export
    from align.ppo import run_ppo

    summary = run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", *ARITH, "ppo.iterations=2", "ppo.eval_every=1", "ppo.eval_at_start=false",
        f"run.output_dir={tmp_path}", "run.name=noinit"]))
    assert "eval_initial" not in summary and summary["eval_final"]["iteration"] == 2
    its = sorted({json.loads(line)["iteration"] for line in (tmp_path / "noinit" / "samples.jsonl").read_text().splitlines()
                  if '"eval_greedy"' in line})
    assert its == [1, 2]
    export(str(tmp_path / "noinit"), str(tmp_path / "exp"), verify=False)
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "| after |" in card and "| before |" not in card and "greedy accuracy (lenient)" in card
    assert "After iteration 2; before = the base (not evaluated in this run)." in card
