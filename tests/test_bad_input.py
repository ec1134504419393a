"""The bad-input catalogue: every case is something users really hand align, and each must fail
with a message naming the culprit (file:line, config key, function or folder) -- and write or
change nothing on disk. A case *prepares* its input files (the user's), then *triggers* the
failure; the folder is listed with hashes between the two and after, and must be identical.
One row per case; ``python -m pytest tests/test_bad_input.py -v`` lists them."""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align.assets import AssetError
from align.config import ConfigError, load_config
from align.data.rows import DataError
from reward.api import RewardError

PAIR = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _gz_cut(path: Path, lines: list) -> Path:
    """A .jsonl.gz cut short, as a broken download leaves it."""
    data = gzip.compress(("\n".join(json.dumps(x) for x in lines) + "\n").encode())
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _pairs(tmp, lines, strict=True):
    from align.data import load_preference_split

    path = _jsonl(tmp / "pairs.jsonl", lines)
    return lambda: load_preference_split(str(path), [], "", strict=strict)


def _prompt_cfg(dataset, **kw):
    from align.config import PromptDataConfig

    return PromptDataConfig(**{"dataset": str(dataset), "text_field": "prompt", "first_words": 0,
                               "template": "{text}", "rows_start": 0, "rows_stop": 0, "eval_prompts": 0, **kw})


def _prompts(tmp, lines, field="prompt"):
    from align.data.prompts import load_prompts

    path = _jsonl(tmp / "prompts.jsonl", lines)
    return lambda: load_prompts(_prompt_cfg(path, text_field=field))


def _reward(tmp, body: str, name="fn", timeout=None):
    from reward.api import call_reward, load_reward_fn

    (tmp / "my_reward.py").write_text(body)
    return lambda: call_reward(load_reward_fn(f"{tmp / 'my_reward.py'}:{name}"), ["p", "q"], ["a", "b"],
                               timeout=timeout)


def _load_model(name: str):
    from align.config import ModelConfig
    from align.models import load_base

    return lambda: load_base(ModelConfig(name=name))


def _truncated_gguf(tmp):
    from align.assets import GGUF_FILE, GGUF_PACKAGE, _package_file

    src = _package_file(GGUF_PACKAGE, GGUF_FILE)
    cut = tmp / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    return _load_model(str(cut))


def _truncated_adapter(tmp, tiny_adapter):
    from align.export import export

    bad = tmp / "adapter"
    shutil.copytree(tiny_adapter, bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    return lambda: export(bad, tmp / "out", vllm_check=False)


def _not_writable_output(tmp):
    from align.runs import start_run

    (tmp / "blocker").write_text("a file where the output folder should be")
    cfg = load_config("dpo", None, [f"run.output_dir={tmp / 'blocker' / 'runs'}", "run.name=x"])
    return lambda: start_run(cfg, "dpo")


def _cli_config(tmp, text: str, *overrides):
    path = tmp / "job.yaml"
    path.write_text(text)
    return lambda: load_config("ppo", path, list(overrides))


def _too_long_pairs(tmp):
    """Not an error: pairs longer than train.max_length are cut, and the count is reported."""
    from align.scoring.pairs import truncation_report

    ds = {"prompt_ids": [[1] * 300, [1] * 10, [1] * 10], "chosen_ids": [[2] * 5, [2] * 500, [2] * 5],
          "rejected_ids": [[3] * 5, [3] * 5, [3] * 5]}

    class DS(dict):
        def __len__(self):
            return 3

    def trigger():
        rep = truncation_report(DS(ds), max_length=384, max_prompt_length=256)
        raise DataError(rep["message"])  # surfaced as the run prints it

    return trigger


def _resume_changed(tmp, tiny_model_path):
    from align.checkpoints import check_same_config
    from align.config import dump_yaml

    saved = load_config("dpo", None, [f"model.name={tiny_model_path}"])
    (tmp / "config.yaml").write_text(dump_yaml(saved))
    return lambda: check_same_config(tmp / "config.yaml", load_config("dpo", None, [
        f"model.name={tiny_model_path}", "train.beta=0.3"]))


def _config(job, *overrides):
    return lambda: load_config(job, None, list(overrides))


def _ppo_check(*overrides):
    from align.ppo import check_config

    return lambda: check_config(load_config("ppo", None, list(overrides)))


def _train_splits(tmp, lines):
    from align.config import DataConfig
    from align.data import load_preference_splits

    path = _jsonl(tmp / "pairs.jsonl", lines)
    return lambda: load_preference_splits(DataConfig(dataset=str(path), train_subsets=[], eval_subsets=[]))


def _pairs_path(path):
    from align.data import load_preference_split

    return lambda: load_preference_split(str(path), [], "")


def _reward_spec(spec):
    from reward.api import load_reward_fn

    return lambda: load_reward_fn(spec)


def _export_into_non_empty(tmp, adapter):
    from align.export import export

    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("user's file")
    return lambda: export(adapter, tmp / "out", vllm_check=False)


def _tiny_run(tmp, adapter, name="run"):
    """A run folder as `align dpo` leaves it (config, metrics, adapter, a checkpoint)."""
    run = tmp / "runs" / name
    shutil.copytree(adapter, run / "adapter")
    shutil.copytree(adapter, run / "checkpoints" / "step-1" / "adapter")
    (run / "config.yaml").write_text(f"model:\n  name: {json.loads((adapter / 'adapter_config.json').read_text())['base_model_name_or_path']}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    return run


def _export_onto_source(tmp, adapter, where: str):
    from align.export import export

    run = _tiny_run(tmp, adapter)
    out = {"same": run, "inside": run / "exported", "parent": run.parent}[where]
    return lambda: export(run, out, force=True, vllm_check=False)


def _job(tmp, job: str, *overrides):
    """A whole job through the CLI's entry (as `align JOB ...` runs it), writing under tmp/runs."""
    import contextlib
    import io

    from align.cli import main

    def trigger():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([job, *overrides, f"run.output_dir={tmp / 'runs'}", "run.name=bad"])
        raise RuntimeError(f"exit {rc}: {err.getvalue()}")

    return trigger


def _dpo_bad_data(tmp, tiny_model_path):
    path = _jsonl(tmp / "pairs.jsonl", [PAIR, "{not json"])
    return _job(tmp, "dpo", f"model.name={tiny_model_path}", f"data.dataset={path}", "data.train_subsets=[]",
                "data.eval_subsets=[]", "data.strict=true")


def _ppo_job(tmp, tiny_model_path, *overrides):
    path = _jsonl(tmp / "prompts.jsonl", [{"prompt": "Hi"}, {"prompt": "Yo"}, {"prompt": "Hey"}])
    return _job(tmp, "ppo", f"model.name={tiny_model_path}", f"data.dataset={path}", "data.eval_prompts=1",
                "ppo.prompts_per_iteration=2", "ppo.minibatch_size=2", "reward.function=reward.examples:length_target",
                *overrides)


def _locked_run_folder(tmp, tiny_model_path):
    """Another live process holds the run folder's lock."""
    run = tmp / "runs" / "bad"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(run / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('process 4242 on testhost'); f.flush(); print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    _locked_run_folder.holder = holder
    return _job(tmp, "dpo", f"model.name={tiny_model_path}")


def _hanging_reward(tmp):
    return _reward(tmp, "import time\ndef fn(p, c, **k):\n    time.sleep(30)\n    return [0.0] * len(c)\n",
                   timeout=0.5)


def _ctrl_c_while_loading(tmp, tiny_model_path, monkeypatch):
    import align.models

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(align.models, "load_base", interrupted)
    return _job(tmp, "dpo", f"model.name={tiny_model_path}")


def _user_folder_as_run_name(tmp, tiny_model_path):
    """run.name names a folder of the user's (not a run of align): refused, untouched."""
    mine = tmp / "runs" / "bad"
    (mine / "adapter").mkdir(parents=True)
    (mine / "plots.png").write_bytes(b"the user's own plot")
    (mine / "adapter" / "README.md").write_text("the user's notes")
    return _job(tmp, "dpo", f"model.name={tiny_model_path}")


def _resume_as_another_job(tmp, tiny_model_path):
    """A DPO run (with a checkpoint) continued as `align ppo --resume`."""
    run = tmp / "runs" / "bad"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "run.json").write_text('{"job": "dpo"}\n')
    (run / "config.yaml").write_text(f"model:\n  name: {tiny_model_path}\nrun:\n  seed: 0\ntrain:\n  beta: 0.1\n")
    return _ppo_job(tmp, tiny_model_path, "--resume")


def _eval(tmp, *argv):
    """`align eval ...` through the CLI's entry; exit status and stderr in the exception."""
    import contextlib
    import io

    from align.cli import main

    def trigger():
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(["eval", *argv])
        raise RuntimeError(f"exit {rc}: {err.getvalue()}")

    return trigger


def _eval_empty_data(tmp, adapter, monkeypatch):
    (tmp / "empty.jsonl").write_text("")
    import align.evaluation

    def no_model(*a, **k):  # the data is checked before any model loads
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(align.evaluation, "load_targets", no_model)
    return _eval(tmp, str(adapter), "--data", str(tmp / "empty.jsonl"))


def _reward_exits(tmp, exc: str):
    return _reward(tmp, f"def fn(p, c, **k):\n    raise {exc}\n")


def _serve_port_taken(tmp, adapter):
    import socket

    from align.serve import serve

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    _serve_port_taken.sock = taken
    return lambda: serve([str(adapter)], port=taken.getsockname()[1], log=lambda m: (_ for _ in ()).throw(
        AssertionError(f"printed before the check: {m}")))


def _api_key_file_shared(tmp):
    from align.serve import read_api_key

    (tmp / "key.txt").write_text("s3cret\n")
    (tmp / "key.txt").chmod(0o644)
    return lambda: read_api_key(str(tmp / "key.txt"), None)


CASES = [
    # --- data files ---------------------------------------------------------------------
    ("malformed_jsonl", lambda t, a: _pairs(t, [PAIR, "{not json", PAIR]),
     DataError, ["pairs.jsonl:2", "malformed JSON"]),
    ("missing_field", lambda t, a: _pairs(t, [PAIR, {"prompt": "x", "chosen": "y"}]),
     DataError, ["pairs.jsonl:2", "missing field", "'rejected'"]),
    ("empty_answer", lambda t, a: _pairs(t, [{**PAIR, "chosen": ""}]),
     DataError, ["pairs.jsonl:1", "empty"]),
    ("empty_prompt", lambda t, a: _pairs(t, [PAIR, PAIR, {**PAIR, "prompt": " "}]),
     DataError, ["pairs.jsonl:3", "empty prompt"]),
    ("no_usable_pairs", lambda t, a: _train_splits(t, [{"prompt": 1}, "[]"]),
     DataError, ["pairs.jsonl", "no usable training pairs"]),
    ("dataset_path_missing", lambda t, a: _pairs_path(t / "nope.jsonl"),
     FileNotFoundError, ["nope.jsonl"]),
    ("prompt_field_missing", lambda t, a: _prompts(t, [{"text": "hi"}]),
     DataError, ["prompts.jsonl:1", "missing field 'prompt'", "data.text_field"]),
    ("prompt_empty", lambda t, a: _prompts(t, [{"prompt": ""}]),
     DataError, ["prompts.jsonl:1", "field 'prompt' is empty"]),
    ("dialogues_too_long", lambda t, a: _too_long_pairs(t),
     DataError, ["1 of 3 pairs have prompts longer than train.max_prompt_length=256",
                 "1 have an answer cut to fit train.max_length=384"]),
    ("pairs_gz_truncated", lambda t, a: _pairs_path(_gz_cut(t / "pairs.jsonl.gz", [PAIR] * 400)),
     DataError, ["pairs.jsonl.gz", "truncated or corrupt after line"]),
    ("prompts_gz_truncated", lambda t, a: (lambda p: lambda: __import__("align.data.prompts").data.prompts
                                           .load_prompts(_prompt_cfg(p)))(
        _gz_cut(t / "prompts.jsonl.gz", [{"prompt": f"tell me about {i}"} for i in range(400)])),
     DataError, ["prompts.jsonl.gz", "truncated or corrupt after line"]),
    ("prompts_rows_window_empty", lambda t, a: (lambda p: lambda: __import__("align.data.prompts").data.prompts
                                                .load_prompts(_prompt_cfg(p, rows_start=1200, rows_stop=2000)))(
        _jsonl(t / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])),
     DataError, ["has 2 rows", "[1200:2000)", "data.rows_start=0 data.rows_stop=0"]),
    ("prompts_dataset_not_set", lambda t, a: lambda: __import__("align.data.prompts").data.prompts
     .load_prompts(_prompt_cfg("")),
     DataError, ["data.dataset is not set", "configs/grpo_arithmetic.yaml", "arithmetic"]),
    # --- models and adapters ------------------------------------------------------------
    ("unknown_model_offline", lambda t, a: _load_model("nobody/no-such-model"),
     AssetError, ["nobody/no-such-model", "mirror", "prepare-assets"]),
    ("model_path_missing", lambda t, a: _load_model(str(t / "no_model_here")),
     AssetError, ["no_model_here"]),
    ("gguf_truncated", lambda t, a: _truncated_gguf(t),
     AssetError, ["cut.gguf", "truncated or corrupt"]),
    ("adapter_truncated", lambda t, a: _truncated_adapter(t, a["adapter"]),
     Exception, ["adapter_model.safetensors", "truncated or corrupt"]),
    # --- config -------------------------------------------------------------------------
    ("config_unknown_key", lambda t, a: _config("dpo", "train.learnin_rate=1e-4"),
     ConfigError, ["train.learnin_rate", "known in this section"]),
    ("config_wrong_type", lambda t, a: _config("dpo", "train.batch_size=eight"),
     ConfigError, ["train.batch_size", "expects int"]),
    ("config_yaml_invalid", lambda t, a: _cli_config(t, "ppo: [unclosed\n"),
     ConfigError, ["job.yaml", "not valid YAML"]),
    ("config_file_missing", lambda t, a: lambda: load_config("dpo", t / "missing.yaml"),
     ConfigError, ["missing.yaml", "does not exist"]),
    ("config_wrong_type_in_file", lambda t, a: _cli_config(t, "lora:\n  r: [8]\n"),
     ConfigError, ["job.yaml", "lora.r", "expects int"]),
    ("lora_rank_zero", lambda t, a: _config("ppo", "lora.r=0"),
     ConfigError, ["lora.r", "must be > 0"]),
    ("lora_rank_in_the_billions", lambda t, a: _config("dpo", "lora.r=3000000000"),
     ConfigError, ["lora.r", "<= 1024", "3000000000"]),
    ("lora_alpha_negative", lambda t, a: _config("dpo", "lora.alpha=-16"),
     ConfigError, ["lora.alpha", "must be > 0"]),
    ("lora_dropout_one", lambda t, a: _config("dpo", "lora.dropout=1"),
     ConfigError, ["lora.dropout", "< 1.0"]),
    ("learning_rate_nan", lambda t, a: _config("dpo", "train.learning_rate=nan"),
     ConfigError, ["train.learning_rate", "finite", "nan"]),
    ("learning_rate_inf", lambda t, a: _config("ppo", "ppo.learning_rate=inf"),
     ConfigError, ["ppo.learning_rate", "finite"]),
    ("beta_negative", lambda t, a: _config("dpo", "train.beta=-0.1"),
     ConfigError, ["train.beta", "must be > 0"]),
    ("warmup_ratio_above_one", lambda t, a: _config("dpo", "train.warmup_ratio=1.5"),
     ConfigError, ["train.warmup_ratio", "<= 1.0"]),
    ("max_train_pairs_negative", lambda t, a: _config("dpo", "data.max_train_pairs=-5"),
     ConfigError, ["data.max_train_pairs", ">= 0"]),
    ("prompt_length_not_below_length", lambda t, a: _config("dpo", "train.max_prompt_length=128"),
     ConfigError, ["train.max_prompt_length", "smaller than train.max_length"]),
    ("temperature_zero", lambda t, a: _config("ppo", "rollout.temperature=0"),
     ConfigError, ["rollout.temperature", "must be > 0"]),
    ("top_p_zero", lambda t, a: _config("ppo", "rollout.top_p=0"),
     ConfigError, ["rollout.top_p", "> 0.0"]),
    ("kl_coef_negative", lambda t, a: _config("ppo", "ppo.kl_coef=-0.05"),
     ConfigError, ["ppo.kl_coef", ">= 0"]),
    ("value_learning_rate_negative", lambda t, a: _config("ppo", "ppo.value_learning_rate=-1e-4"),
     ConfigError, ["ppo.value_learning_rate", "must be > 0"]),
    ("gamma_above_one", lambda t, a: _config("ppo", "ppo.gamma=1.5"),
     ConfigError, ["ppo.gamma", "<= 1.0"]),
    ("kl_estimator_unknown", lambda t, a: _config("ppo", "ppo.kl_estimator=k4"),
     ConfigError, ["ppo.kl_estimator", "k1, k2 or k3"]),
    ("dtype_unknown", lambda t, a: _config("dpo", "model.dtype=float64"),
     ConfigError, ["model.dtype", "float32, bfloat16 or float16"]),
    ("keep_last_zero", lambda t, a: _config("rm", "run.keep_last=0"),
     ConfigError, ["run.keep_last", ">= 1"]),
    ("rollout_engine_unknown", lambda t, a: _config("ppo", "rollout.engine=sglang"),
     ConfigError, ["rollout.engine", "hf, vllm or vllm-server", "sglang"]),
    ("advantage_unknown", lambda t, a: _ppo_check("ppo.advantage=ppo2"),
     ConfigError, ["ppo.advantage", "gae, grpo, rloo", "ppo2"]),
    ("group_baseline_needs_group", lambda t, a: _ppo_check("ppo.advantage=rloo", "ppo.samples_per_prompt=1",
                                                            "ppo.minibatch_size=16"),
     ConfigError, ["ppo.samples_per_prompt", ">= 2", "rloo"]),
    ("template_unknown_field", lambda t, a: _config("ppo", "data.template=Review: {review}"),
     ConfigError, ["data.template", "only the field {text}", "{review}"]),
    ("template_without_text", lambda t, a: _config("ppo", "data.template=Continue the review."),
     ConfigError, ["data.template", "must contain {text}"]),
    ("report_to_unknown", lambda t, a: _config("dpo", "run.report_to=[mlflow]"),
     ConfigError, ["run.report_to", "mlflow"]),
    ("batch_not_divisible", lambda t, a: _config("ppo", "ppo.prompts_per_iteration=5", "ppo.samples_per_prompt=3"),
     ConfigError, ["ppo.minibatch_size", "= 15"]),
    ("resume_value_unknown", lambda t, a: _config("rm", "run.resume=yes"),
     ConfigError, ["run.resume", "off, auto or must"]),
    ("resume_changed_config", lambda t, a: _resume_changed(t, a["tiny_model_path"]),
     ConfigError, ["train.beta: 0.1 -> 0.3", "config.yaml"]),
    # --- reward functions ---------------------------------------------------------------
    ("reward_file_missing", lambda t, a: _reward_spec(f"{t / 'nope.py'}:fn"),
     RewardError, ["nope.py", "does not exist"]),
    ("reward_function_missing", lambda t, a: _reward(t, "def other(p, c, **k):\n    return [0.0] * len(c)\n"),
     RewardError, ["my_reward.py", "'fn'"]),
    ("reward_wrong_length", lambda t, a: _reward(t, "def fn(p, c, **k):\n    return [1.0]\n"),
     RewardError, ["fn", "my_reward.py:1", "1 values for 2 completions"]),
    ("reward_nan", lambda t, a: _reward(t, "def fn(p, c, **k):\n    return [1.0, float('nan')]\n"),
     RewardError, ["fn", "sample 1 is nan"]),
    ("reward_raises", lambda t, a: _reward(t, "def fn(p, c, **k):\n    return {}['label']\n"),
     RewardError, ["fn", "raised KeyError"]),
    ("reward_import_error", lambda t, a: _reward(t, "import no_such_package_xyz\n"),
     RewardError, ["my_reward.py", "no_such_package_xyz"]),
    ("reward_hangs", lambda t, a: _hanging_reward(t),
     RewardError, ["fn", "my_reward.py:2", "reward.timeout_seconds=0.5"]),
    # --- output folders and whole jobs --------------------------------------------------
    ("output_dir_not_writable", lambda t, a: _not_writable_output(t),
     OSError, ["run.output_dir", "blocker"]),
    ("export_out_not_empty", lambda t, a: _export_into_non_empty(t, a["adapter"]),
     Exception, ["not empty", "--force"]),
    ("export_out_is_the_run", lambda t, a: _export_onto_source(t, a["adapter"], "same"),
     Exception, ["--out", "overlaps the source", "runs/run"]),
    ("export_out_inside_the_run", lambda t, a: _export_onto_source(t, a["adapter"], "inside"),
     Exception, ["exported", "overlaps the source"]),
    ("export_out_contains_the_run", lambda t, a: _export_onto_source(t, a["adapter"], "parent"),
     Exception, ["overlaps the source"]),
    ("dpo_job_bad_data_writes_nothing", lambda t, a: _dpo_bad_data(t, a["tiny_model_path"]),
     RuntimeError, ["exit 1", "pairs.jsonl:2", "malformed JSON"]),
    ("ppo_job_unknown_estimator", lambda t, a: _ppo_job(t, a["tiny_model_path"], "ppo.advantage=vtrace"),
     RuntimeError, ["exit 2", "ppo.advantage", "vtrace"]),
    ("ppo_job_tracker_not_installed", lambda t, a: _ppo_job(t, a["tiny_model_path"], "run.report_to=[wandb]"),
     RuntimeError, ["exit 1", "run.report_to lists wandb", "not installed"]),
    ("run_folder_in_use", lambda t, a: _locked_run_folder(t, a["tiny_model_path"]),
     RuntimeError, ["exit 1", "runs/bad", "in use by process 4242 on testhost"]),
    ("ctrl_c_while_loading", lambda t, a: _ctrl_c_while_loading(t, a["tiny_model_path"], a["monkeypatch"]),
     RuntimeError, ["exit 130", "align: interrupted"]),
    # --- second hostile hour (issue 27): names are names, folders are the user's ----------
    ("run_name_absolute", lambda t, a: _config("dpo", f"run.name={t / 'abs'}"),
     ConfigError, ["run.name", "one folder name", "run.output_dir"]),
    ("run_name_climbs_out", lambda t, a: _config("dpo", "run.name=../../x"),
     ConfigError, ["run.name", "'../../x'"]),
    ("run_name_dot_dot", lambda t, a: _config("ppo", "run.name=.."),
     ConfigError, ["run.name", "not . or .."]),
    ("run_name_is_a_users_folder", lambda t, a: _user_folder_as_run_name(t, a["tiny_model_path"]),
     RuntimeError, ["exit 1", "runs/bad", "is not a run of align", "nothing in it was touched"]),
    ("resume_a_dpo_run_as_ppo", lambda t, a: _resume_as_another_job(t, a["tiny_model_path"]),
     RuntimeError, ["exit 1", "is an `align dpo` run", "align dpo --resume"]),
    ("config_duplicate_section", lambda t, a: _cli_config(t, "ppo:\n  kl_coef: 0.1\nlora:\n  r: 4\nppo:\n  iterations: 3\n"),
     ConfigError, ["job.yaml", "'ppo' appears twice", "lines 1 and 5"]),
    ("config_duplicate_key", lambda t, a: _cli_config(t, "ppo:\n  kl_coef: 0.1\n  kl_coef: 0.2\n"),
     ConfigError, ["job.yaml", "'kl_coef' appears twice", "lines 2 and 3"]),
    ("config_section_given_a_value", lambda t, a: _config("dpo", "train=5"),
     ConfigError, ["'train' is a section", "train.beta="]),
    ("learning_rate_absurd", lambda t, a: _config("dpo", "train.learning_rate=1e10"),
     ConfigError, ["train.learning_rate", "<= 1.0", "10000000000.0"]),
    ("eval_data_empty", lambda t, a: _eval_empty_data(t, a["adapter"], a["monkeypatch"]),
     RuntimeError, ["exit 1", "empty.jsonl", "no usable preference pairs"]),
    ("eval_pairs_negative", lambda t, a: _eval(t, str(a["adapter"]), "--data", "x.jsonl", "--pairs", "-1"),
     RuntimeError, ["exit 1", "--pairs must be >= 0, got -1"]),
    ("eval_out_is_the_working_folder", lambda t, a: _eval(t, str(a["adapter"]), "--data", "x.jsonl", "--out", "."),
     RuntimeError, ["exit 1", "--out '.'", "current folder"]),
    ("reward_raises_system_exit", lambda t, a: _reward_exits(t, "SystemExit(3)"),
     RewardError, ["fn", "my_reward.py", "raised SystemExit: 3", "not exit"]),
    ("reward_raises_keyboard_interrupt", lambda t, a: _reward_exits(t, "KeyboardInterrupt"),
     RewardError, ["fn", "my_reward.py", "raised KeyboardInterrupt"]),
    ("serve_port_in_use", lambda t, a: _serve_port_taken(t, a["adapter"]),
     ValueError, ["port", "is in use", "--port 0"]),
    ("serve_key_file_readable_by_others", lambda t, a: _api_key_file_shared(t),
     ValueError, ["key.txt", "can be read by other users", "chmod 600"]),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes (folders: 'dir'), but for
    Python's bytecode cache."""
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:  # Python's own cache beside an imported reward file
            continue
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_catalogue_has_at_least_50_cases():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, prepare, exc, culprits", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_culprit(name, prepare, exc, culprits, tmp_path, tiny_adapter, tiny_model_path,
                                     monkeypatch):
    """The case works in ``root/a/b`` (also the working folder) with $HOME at ``root/home``, and
    the whole of ``root`` is compared: a run name that climbs two levels up, or a write to the
    working folder or the home folder, shows."""
    from align.assets import mirror_dir

    work, home = tmp_path / "a" / "b", tmp_path / "home"
    work.mkdir(parents=True)
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ALIGN_MIRROR", str(mirror_dir()))  # the real one, wherever $HOME points
    monkeypatch.setenv("HOME", str(home))
    trigger = prepare(work, {"adapter": tiny_adapter, "tiny_model_path": tiny_model_path,
                             "monkeypatch": monkeypatch})
    before = _snapshot(tmp_path)
    try:
        with pytest.raises(exc) as info:
            trigger()
    finally:
        holder = getattr(_locked_run_folder, "holder", None)
        if holder is not None:
            holder.kill()
            holder.wait()
            _locked_run_folder.holder = None
        sock = getattr(_serve_port_taken, "sock", None)
        if sock is not None:
            sock.close()
            _serve_port_taken.sock = None
    message = str(info.value)
    for culprit in culprits:
        assert culprit in message, f"{name}: {culprit!r} not in {message!r}"
    after = _snapshot(tmp_path)
    assert after == before, f"{name}: the failure changed the disk: " \
        f"{sorted(set(after.items()) ^ set(before.items()))[:5]}"
