"""Two processes (``accelerate launch``, gloo on this CPU) compute what one process computes with
the same global batch, and only rank 0 writes the run folder."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _launch(args: list[str], processes: int, log: Path, config: str = "ddp.yaml") -> None:
    args = [*args, "model.dtype=float32"]  # exact agreement is float32's (auto may pick bf16 here)
    if processes == 1:
        cmd = [sys.executable, "-m", "align.cli", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch",  # the shipped config, as documented
               "--config_file", str(ROOT / "configs" / "accelerate" / config), "--mixed_precision", "no",
               "--num_processes", str(processes), "-m", "align.cli", *args]
    rc = subprocess.call(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, timeout=600)
    assert rc == 0, log.read_text()[-4000:]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _by_step(records, key):
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


def test_dpo_two_processes_match_one(tmp_path, tiny_model_path, shared):
    common = ["dpo", f"model.name={tiny_model_path}", "data.max_train_pairs=24", "data.max_eval_pairs=8",
              "train.epochs=1", "train.max_length=96", "train.max_prompt_length=48",
              f"run.output_dir={tmp_path}", "run.save_every=3", "run.plot=false"]
    _launch([*common, "train.batch_size=4", "run.name=one"], 1, tmp_path / "one.log")
    _launch([*common, "train.batch_size=2", "run.name=two"], 2, tmp_path / "two.log")  # 2 x 2 = 4
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    for key in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"):
        a, b = _by_step(one, key), _by_step(two, key)
        assert sorted(a) == sorted(b) == list(range(1, 7)), key  # 6 steps, each logged once
        assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (key, a, b)
    assert len({r["loss"] for r in one if r.get("loss") is not None}) > 2  # the loss moved
    ckpt = tmp_path / "two" / "checkpoints" / "step-6"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    ev1 = json.loads((tmp_path / "one" / "eval.json").read_text())
    ev2 = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert abs(ev1["mean_margin"] - ev2["mean_margin"]) < 1e-4


REWARD = '''
def vowels(prompts, completions, **info):
    return [10 * sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
'''


def test_ppo_two_processes_match_one(tmp_path, tiny_model_path):
    """Rollouts are seeded per sample (not per batch), whitening and the KL controller use the
    global batch, gradients are averaged over the global token count: 2 ranks == 1 process."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say something about {w}."})
                                 for w in ["bread", "films", "Paris", "music", "rain", "tea", "cats", "maps"]))
    (tmp_path / "rw.py").write_text(REWARD)
    common = ["ppo", f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.text_field=prompt",
              "data.first_words=0", "data.template={text}", "data.rows_start=0", "data.rows_stop=0",
              "data.eval_prompts=2", "rollout.max_new_tokens=6", f"reward.function={tmp_path / 'rw.py'}:vowels",
              "ppo.iterations=3", "ppo.prompts_per_iteration=4", "ppo.samples_per_prompt=2",
              "ppo.minibatch_size=8", "ppo.ppo_epochs=1", "ppo.eval_every=3", "ppo.kl_target=2",
              "ppo.learning_rate=5e-2", "ppo.value_learning_rate=5e-2",
              f"run.output_dir={tmp_path}", "run.save_every=3", "run.plot=false"]
    _launch([*common, "run.name=one"], 1, tmp_path / "one.log")
    _launch([*common, "run.name=two"], 2, tmp_path / "two.log")
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    for key in ("reward_mean", "reward_std", "kl_per_answer", "kl_coef", "value_loss", "entropy",
                "eval/reward_mean", "eval/kl_per_answer"):
        a, b = _by_step(one, key), _by_step(two, key)
        assert a and sorted(a) == sorted(b), key
        assert all(abs(a[s] - b[s]) < 1e-4 * max(1.0, abs(a[s])) for s in a), (key, a, b)
    assert _by_step(one, "kl_per_answer")[3] != 0  # the policy moved, identically in both
    ckpt = tmp_path / "two" / "checkpoints" / "step-3"
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2

    # FSDP2 (configs/accelerate/fsdp.yaml: ppo.parallelism=auto follows it): the base's layers and
    # embeddings sharded over the 2 ranks, the same numbers as DDP; its checkpoint (adapters and
    # optimizer gathered from the shards) resumes to the same end
    _launch([*common, "run.name=fsdp", "run.save_every=2"], 2, tmp_path / "fsdp.log", config="fsdp.yaml")
    _check_fsdp2_run(tmp_path / "fsdp", two)
    (tmp_path / "fsdp" / "summary.json").unlink()  # as if stopped after the iteration-2 checkpoint
    shutil.rmtree(tmp_path / "fsdp" / "adapter")
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-3", ignore_errors=True)
    _launch([*common, "run.name=fsdp", "run.save_every=2", "--resume"], 2, tmp_path / "resume.log", config="fsdp.yaml")
    assert "resumed at iteration 3" in (tmp_path / "resume.log").read_text()
    _check_fsdp2_run(tmp_path / "fsdp", two)


def _check_fsdp2_run(run: Path, ddp: list[dict]) -> None:
    assert json.loads((run / "run.json").read_text())["parallelism"] == "fsdp2"
    got = _records(run)
    for key in ("reward_mean", "kl_per_answer", "value_loss", "entropy", "eval/reward_mean", "eval/kl_per_answer"):
        a, b = _by_step(ddp, key), _by_step(got, key)
        assert a and sorted(a) == sorted(b), key
        assert all(abs(a[s] - b[s]) < 1e-4 * max(1.0, abs(a[s])) for s in a), (key, a, b)
    memory = json.loads((run / "summary.json").read_text())["peak_memory_per_rank"]
    assert len(memory) == 2 and all(m["parameters_gib"] > 0 for m in memory)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_asked_where_the_trainer_does_not_apply_it_is_said(tmp_path, tiny_model_path, shared):
    """configs/accelerate/fsdp.yaml on this CPU: transformers' Trainer runs DDP instead (measured);
    align says so and records what ran, instead of leaving the user to believe the base is sharded."""

    args = ["dpo", f"model.name={tiny_model_path}", "data.max_train_pairs=8", "data.max_eval_pairs=4",
            "train.max_length=64", "train.max_prompt_length=32", "train.batch_size=2", f"run.output_dir={tmp_path}",
            "run.name=f", "run.plot=false", "run.save_every=0", "model.dtype=float32"]
    log = tmp_path / "fsdp.log"
    rc = subprocess.call([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--mixed_precision", "no",
                          "--num_processes", "2", "-m", "align.cli", *args],
                         stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, timeout=600)
    assert rc == 0, log.read_text()[-3000:]
    assert log.read_text().count("notice: the launcher asked for FSDP but the Trainer runs DDP") == 1
    assert json.loads((tmp_path / "f" / "run.json").read_text())["parallelism"] == "ddp"
    # the config's RAM-efficient loading gives rank 1 an all-zero base until something sends it
    # rank 0's: the reference pass (before the Trainer) must see the real weights on every rank
    _launch([*[a for a in args if a != "train.batch_size=2"], "train.batch_size=4", "run.name=one"], 1,
            tmp_path / "one.log")
    one, two = _records(tmp_path / "one"), _records(tmp_path / "f")
    for key in ("loss", "rewards/margins"):
        a, b = _by_step(one, key), _by_step(two, key)
        assert a and sorted(a) == sorted(b) and all(abs(a[s] - b[s]) < 1e-4 for s in a), (key, a, b)
