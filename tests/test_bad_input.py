"""The bad-input catalogue: every case is something users really hand align, and each must fail
with a message naming the culprit (file:line, config key, function or folder) -- and write
nothing. One row per case; ``python -m pytest tests/test_bad_input.py -v`` lists them."""
from __future__ import annotations

import json
import shutil
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


def _pairs(tmp, lines, strict=True):
    from align.data import load_preference_split

    return load_preference_split(str(_jsonl(tmp / "pairs.jsonl", lines)), [], "", strict=strict)


def _prompts(tmp, lines, field="prompt"):
    from align.config import PromptDataConfig
    from align.data.prompts import load_prompts

    path = _jsonl(tmp / "prompts.jsonl", lines)
    return load_prompts(PromptDataConfig(dataset=str(path), text_field=field, first_words=0,
                                         template="{text}", rows_start=0, rows_stop=0, eval_prompts=0))


def _reward(tmp, body: str, name="fn"):
    from reward.api import call_reward, load_reward_fn

    (tmp / "my_reward.py").write_text(body)
    return call_reward(load_reward_fn(f"{tmp / 'my_reward.py'}:{name}"), ["p", "q"], ["a", "b"])


def _load_model(name: str):
    from align.config import ModelConfig
    from align.models import load_base

    return load_base(ModelConfig(name=name))


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
    return export(bad, tmp / "out", vllm_check=False)


def _not_writable_output(tmp):
    from align.runs import start_run

    (tmp / "blocker").write_text("a file where the output folder should be")
    cfg = load_config("dpo", None, [f"run.output_dir={tmp / 'blocker' / 'runs'}", "run.name=x"])
    return start_run(cfg, "dpo")


def _cli_config(tmp, text: str, *overrides):
    path = tmp / "job.yaml"
    path.write_text(text)
    return load_config("ppo", path, list(overrides))


def _too_long_pairs(tmp):
    """Not an error: pairs longer than train.max_length are cut, and the count is reported."""
    from align.dpo.packing import truncation_report

    ds = {"prompt_ids": [[1] * 300, [1] * 10, [1] * 10], "chosen_ids": [[2] * 5, [2] * 500, [2] * 5],
          "rejected_ids": [[3] * 5, [3] * 5, [3] * 5]}

    class DS(dict):
        def __len__(self):
            return 3

    rep = truncation_report(DS(ds), max_length=384, max_prompt_length=256)
    raise DataError(rep["message"])  # surfaced as the run prints it


def _resume_changed(tmp, tiny_model_path):
    from align.checkpoints import check_same_config
    from align.config import dump_yaml

    saved = load_config("dpo", None, [f"model.name={tiny_model_path}"])
    (tmp / "config.yaml").write_text(dump_yaml(saved))
    return check_same_config(tmp / "config.yaml", load_config("dpo", None, [
        f"model.name={tiny_model_path}", "train.beta=0.3"]))


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
    ("config_unknown_key", lambda t, a: load_config("dpo", None, ["train.learnin_rate=1e-4"]),
     ConfigError, ["train.learnin_rate", "known in this section"]),
    ("config_wrong_type", lambda t, a: load_config("dpo", None, ["train.batch_size=eight"]),
     ConfigError, ["train.batch_size", "expects int"]),
    ("config_yaml_invalid", lambda t, a: _cli_config(t, "ppo: [unclosed\n"),
     ConfigError, ["job.yaml", "not valid YAML"]),
    ("config_file_missing", lambda t, a: load_config("dpo", t / "missing.yaml"),
     ConfigError, ["missing.yaml", "does not exist"]),
    ("config_wrong_type_in_file", lambda t, a: _cli_config(t, "lora:\n  r: [8]\n"),
     ConfigError, ["job.yaml", "lora.r", "expects int"]),
    ("lora_rank_zero", lambda t, a: load_config("ppo", None, ["lora.r=0"]),
     ConfigError, ["lora.r", "must be > 0"]),
    ("lora_alpha_negative", lambda t, a: load_config("dpo", None, ["lora.alpha=-16"]),
     ConfigError, ["lora.alpha", "must be > 0"]),
    ("batch_not_divisible", lambda t, a: load_config("ppo", None, ["ppo.prompts_per_iteration=5",
                                                                   "ppo.samples_per_prompt=3"]),
     ConfigError, ["ppo.minibatch_size", "= 15"]),
    ("resume_value_unknown", lambda t, a: load_config("rm", None, ["run.resume=yes"]),
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
    # --- output folders -----------------------------------------------------------------
    ("output_dir_not_writable", lambda t, a: _not_writable_output(t),
     OSError, ["run.output_dir", "blocker"]),
    ("export_out_not_empty", lambda t, a: _export_into_non_empty(t, a["adapter"]),
     Exception, ["not empty", "--force"]),
]


def _train_splits(tmp, lines):
    from align.config import DataConfig
    from align.data import load_preference_splits

    path = _jsonl(tmp / "pairs.jsonl", lines)
    return load_preference_splits(DataConfig(dataset=str(path), train_subsets=[], eval_subsets=[]))


def _pairs_path(path):
    from align.data import load_preference_split

    return load_preference_split(str(path), [], "")


def _reward_spec(spec):
    from reward.api import load_reward_fn

    return load_reward_fn(spec)


def _export_into_non_empty(tmp, adapter):
    from align.export import export

    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("user's file")
    try:
        export(adapter, tmp / "out", vllm_check=False)
    finally:
        assert (tmp / "out" / "keep.txt").read_text() == "user's file"  # nothing overwritten


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory):
    """A PEFT adapter folder on the tiny model, as any run writes it."""
    import copy

    from align.config import LoraConfig
    from align.adapters import save_adapter
    from align.models import add_policy_adapter

    base, _ = tiny_model
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(add_policy_adapter(copy.deepcopy(base), LoraConfig(r=4)), out, base.name_or_path)
    return out


def test_catalogue_has_at_least_20_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, trigger, exc, culprits", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_culprit(name, trigger, exc, culprits, tmp_path, tiny_adapter, tiny_model_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(exc) as info:
        trigger(tmp_path, {"adapter": tiny_adapter, "tiny_model_path": tiny_model_path})
    message = str(info.value)
    for culprit in culprits:
        assert culprit in message, f"{name}: {culprit!r} not in {message!r}"
    # the failure wrote no output folder of its own
    after = sorted(p.name for p in tmp_path.iterdir())
    assert not (set(after) - set(before)) - {"pairs.jsonl", "prompts.jsonl", "my_reward.py", "job.yaml",
                                             "blocker", "cut.gguf", "adapter", "out", "config.yaml"}
    assert not (tmp_path / "out").exists() or name == "export_out_not_empty"
