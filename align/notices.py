"""What a user asked for that has no effect here: one table, checked on every command.

A key or flag that is set (differs from its default) where it does nothing -- ``reward.function``
while ``reward.kind`` is ``classifier``, ``--max-length`` without ``--data`` -- is said, never
silently dropped. Each row names the key, the job or command, the condition in words, and the
settings that make it inert or effective; the test suite runs every row both ways, and
``python -m align.notices`` prints the table for docs/options-without-effect.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

JOBS = ("dpo", "ppo", "rm")        # rows on config keys
COMMANDS = ("eval", "export", "serve")  # rows on command-line flags


@dataclass(frozen=True)
class Inert:
    where: str                      # a job (config key) or a command (flag)
    key: str                        # "reward.function" | "--max-length"
    when: str                       # the condition, in words: "when reward.kind is not function"
    inert: Callable                 # (config or parsed args) -> True where the key does nothing
    value: str                      # a value other than the default (for the docs' and tests' example)
    inert_with: tuple = ()          # settings that make it inert (overrides / argv words)
    effective_with: tuple | None = ()  # settings under which it does act (None: never does)


def _cfg(path: str):
    """``cfg -> value`` of a dotted key."""
    def get(cfg):
        for part in path.split("."):
            cfg = getattr(cfg, part)
        return cfg
    return get


def _adder(rows: list[Inert]):
    def add(where, keys, when, inert, value, inert_with=(), effective_with=()):
        for key in keys if isinstance(keys, tuple) else (keys,):
            rows.append(Inert(where, key, when, inert, value[key] if isinstance(value, dict) else value,
                              inert_with, effective_with))
    return add


def _reward_rows(add) -> None:
    kind, jkind = _cfg("reward.kind"), _cfg("judge.kind")
    add("ppo", "reward.function", "when reward.kind is not function", lambda c: kind(c) != "function",
        "my_reward.py:score", ("reward.kind=dpo", "reward.adapter=runs/x"))
    add("ppo", "reward.adapter", "when reward.kind is function", lambda c: kind(c) == "function",
        "runs/x", (), ("reward.kind=dpo",))
    add("ppo", "reward.beta", "when reward.kind is not dpo", lambda c: kind(c) != "dpo",
        "0.2", (), ("reward.kind=dpo", "reward.adapter=runs/x"))
    add("ppo", "judge.function", "when judge.kind is not function", lambda c: jkind(c) != "function",
        "my_judge.py:score", (), ("judge.kind=function",))
    add("ppo", "judge.adapter", "when judge.kind is not classifier or dpo",
        lambda c: jkind(c) not in ("classifier", "dpo"), "runs/judge", (), ("judge.kind=classifier",))
    add("ppo", "judge.beta", "when judge.kind is not dpo", lambda c: jkind(c) != "dpo",
        "0.2", (), ("judge.kind=dpo", "judge.adapter=runs/judge"))
    add("ppo", "judge.timeout_seconds", "when judge.kind is none", lambda c: jkind(c) == "none",
        "10", (), ("judge.kind=function", "judge.function=f.py:fn"))
    add("ppo", "judge.kind", "when ppo.eval_sampled is false (the judge scores the sampled held-out answers)",
        lambda c: not c.ppo.eval_sampled, "function", ("ppo.eval_sampled=false", "judge.function=f.py:fn"),
        ("judge.function=f.py:fn",))


def _ppo_rows(add) -> None:
    engine, adv = _cfg("rollout.engine"), _cfg("ppo.advantage")
    add("ppo", ("rollout.server_devices", "rollout.server_host", "rollout.server_api_key"),
        "when rollout.engine is not vllm-server", lambda c: engine(c) != "vllm-server",
        {"rollout.server_devices": "1", "rollout.server_host": "127.0.0.2", "rollout.server_api_key": "k"},
        (), ("rollout.engine=vllm-server",))
    add("ppo", "rollout.gpu_memory_fraction", "when rollout.engine is hf (a vLLM setting; on a CPU vLLM sizes its "
        "cache by VLLM_CPU_KVCACHE_SPACE)", lambda c: engine(c) == "hf", "0.5", (), ("rollout.engine=vllm",))
    add("ppo", "rollout.sync", "when rollout.engine is not vllm (in-process)", lambda c: engine(c) != "vllm",
        "merged", (), ("rollout.engine=vllm",))
    add("ppo", ("rollout.parity_prompts", "rollout.parity_every"),
        "when rollout.engine is hf (it samples from the trainer's own weights: nothing to compare)",
        lambda c: engine(c) == "hf", {"rollout.parity_prompts": "4", "rollout.parity_every": "3"},
        (), ("rollout.engine=vllm",))
    add("ppo", ("ppo.value_learning_rate", "ppo.value_clip_range", "ppo.vf_coef", "ppo.critic", "ppo.gamma",
                "ppo.lam"),
        "when ppo.advantage is not gae (critic-free estimators have no critic and no GAE)",
        lambda c: adv(c) != "gae",
        {"ppo.value_learning_rate": "1e-4", "ppo.value_clip_range": "0.5", "ppo.vf_coef": "1.0",
         "ppo.critic": "shared", "ppo.gamma": "0.9", "ppo.lam": "0.9"}, ("ppo.advantage=grpo",))
    add("ppo", ("ppo.scale_rewards", "ppo.skip_equal_reward_groups"),
        "when ppo.advantage is gae (they act on group baselines)", lambda c: adv(c) == "gae",
        {"ppo.scale_rewards": "batch", "ppo.skip_equal_reward_groups": "true"}, (),
        ("ppo.advantage=grpo", "ppo.samples_per_prompt=4"))
    add("ppo", ("data.difficulty_field", "ppo.eval_pass_k"),
        "when data.answer_field is empty (no held-out accuracy)", lambda c: not c.data.answer_field,
        {"data.difficulty_field": "level", "ppo.eval_pass_k": "4"}, ("data.answer_field=",))
    add("ppo", "ppo.old_logprobs", "when ppo.advantage is gae (the engine's log-probs serve critic-free "
        "estimators only)", lambda c: adv(c) == "gae", "engine", (), ("ppo.advantage=grpo",))
    add("ppo", "ppo.kl_horizon", "when ppo.kl_target is 0 (no adaptive KL control)",
        lambda c: c.ppo.kl_target == 0, "5000", (), ("ppo.kl_target=3",))
    add("ppo", "run.log_every", "ever (align ppo logs every iteration)", lambda c: True, "5", (), None)
    add("ppo", ("lora.alpha", "lora.dropout", "lora.target_modules"),
        "when lora.r is full (no adapter: every weight trains)", lambda c: c.lora.r == "full",
        {"lora.alpha": "32", "lora.dropout": "0.1", "lora.target_modules": "[q_proj]"},
        ("lora.r=full", "ppo.advantage=grpo", "ppo.samples_per_prompt=4", "rollout.engine=hf"), ())


def _job_rows(add) -> None:
    for job in ("dpo", "ppo"):
        add(job, ("eval.prompts", "eval.prompt_subsets", "eval.num_prompts", "eval.max_new_tokens", "eval.judge"),
            "when eval.generate is false", lambda c: not c.eval.generate,
            {"eval.prompts": "p.jsonl", "eval.prompt_subsets": "[helpful-base]", "eval.num_prompts": "8",
             "eval.max_new_tokens": "16", "eval.judge": "function:f.py:fn"},
            (), ("eval.generate=true", "eval.judge=function:f.py:fn"))
    for job in JOBS:
        add(job, "run.keep_last", "when run.save_every is 0 (no checkpoints)", lambda c: c.run.save_every == 0,
            "5", ("run.save_every=0",), ("run.save_every=10",))
    for job in ("dpo", "rm"):
        add(job, ("data.eval_subsets", "data.max_eval_pairs"), "when evaluate is false",
            lambda c: not c.evaluate, {"data.eval_subsets": "[harmless-base]", "data.max_eval_pairs": "50"},
            ("evaluate=false",), ())
    for job in ("dpo", "rm"):
        add(job, "train.eval_max_length", "when evaluate is false", lambda c: not c.evaluate, "256",
            ("evaluate=false",), ())
    add("dpo", "data.validation_pairs", "when evaluate is false (nothing would be evaluated on them, so none are held "
        "out of training)", lambda c: not c.evaluate, "100", ("evaluate=false",), ())
    add("dpo", ("train.loss_type", "train.loss_weights"), "when train.objective is not dpo (TRL's DPO losses only)",
        lambda c: c.train.objective != "dpo", {"train.loss_type": "ipo", "train.loss_weights": "[1.0]"},
        ("train.objective=simpo",), ())
    add("dpo", "train.simpo_gamma_ratio", "when train.objective is not simpo", lambda c: c.train.objective != "simpo",
        "1.0", (), ("train.objective=simpo",))
    add("dpo", ("train.kto_desirable_weight", "train.kto_undesirable_weight"), "when train.objective is not kto",
        lambda c: c.train.objective != "kto", "2.0", (), ("train.objective=kto",))
    add("dpo", "train.reference_cache", "when train.objective is simpo or orpo and evaluate is false (no reference "
        "pass at all)", lambda c: c.train.objective in ("simpo", "orpo") and not c.evaluate, "off",
        ("train.objective=simpo", "evaluate=false"), ())
    add("dpo", "train.label_smoothing", "when train.objective is orpo or kto (no smoothed form)",
        lambda c: c.train.objective in ("orpo", "kto"), "0.1", ("train.objective=orpo",), ())


def _command_rows(add) -> None:
    """Command-line flags: ``inert`` gets the parsed arguments."""
    add("eval", ("--subsets", "--split", "--pairs", "--rows", "--max-length", "--reference-cache"), "without --data",
        lambda a: not a.data, {"--subsets": "helpful-base", "--split": "test", "--pairs": "10",
                               "--rows": "half-a", "--max-length": "256", "--reference-cache": "off"},
        (), ("--data", "pairs.jsonl"))
    add("eval", ("--prompts", "--prompt-subsets", "--num-prompts", "--temperature", "--judge"), "without --generate",
        lambda a: not a.generate,
        {"--prompts": "p.jsonl", "--prompt-subsets": "helpful-base", "--num-prompts": "8",
         "--temperature": "0.7", "--judge": "function:f.py:fn"},
        ("--data", "pairs.jsonl"), ("--generate",))
    # --accuracy generates (greedy) too: its answers' length and engine are these flags'
    add("eval", ("--max-new-tokens", "--no-vllm"), "without --generate or --accuracy",
        lambda a: not (a.generate or a.accuracy), {"--max-new-tokens": "8", "--no-vllm": ""},
        ("--data", "pairs.jsonl"), ("--accuracy", "arithmetic-heldout"))
    add("export", "--dtype", "without --merge (an adapter export keeps the adapter's own weights)",
        lambda a: not a.merge, "bfloat16", (), ("--merge",))
    add("export", "--no-vllm-check", "with --no-verify (nothing is checked at all)",
        lambda a: not a.verify, "", ("--no-verify",), ())
    add("serve", "--max-lora-rank", "without adapters to serve", lambda a: not (a.adapters or a.name), "16",
        ("--base", "m"), ("runs/x",))


def _rows() -> list[Inert]:
    rows: list[Inert] = []
    for part in (_reward_rows, _ppo_rows, _job_rows, _command_rows):
        part(_adder(rows))
    return rows


TABLE: list[Inert] = _rows()


def _set_in_config(cfg, job: str, key: str) -> bool:
    from .config import JOBS as CONFIGS

    return _cfg(key)(cfg) != _cfg(key)(CONFIGS[job]())


def _set_in_args(args, parser, flag: str) -> bool:
    action = parser._option_string_actions[flag]  # argparse's table of a parser's flags
    return getattr(args, action.dest) != action.default


def notices(where: str, obj, parser=None) -> list[str]:
    """The notices for a job's config (``where`` = dpo | ppo | rm), or for a command's parsed
    arguments (eval | export | serve; ``parser`` = that command's parser, for the defaults): one
    per key that is set and has no effect."""
    out = []
    for row in TABLE:
        if row.where != where:
            continue
        given = _set_in_config(obj, where, row.key) if where in JOBS else _set_in_args(obj, parser, row.key)
        if given and row.inert(obj):
            out.append(f"note: {row.key} has no effect {row.when}; it is ignored")
    return out


def say(where: str, obj, parser=None, file=sys.stderr) -> list[str]:
    msgs = notices(where, obj, parser)
    for m in msgs:
        print(m, file=file)
    return msgs


def markdown() -> str:
    lines = ["# Options that have no effect (and are said to)", "",
             "Generated from `align/notices.py` by `python -m align.notices`; do not edit by hand. A key or",
             "flag set to a value other than its default, where it has no effect, prints a `note:` line",
             "naming it (the test suite runs every row both ways).", "",
             "| job / command | key or flag | has no effect |", "|---|---|---|"]
    lines += [f"| {r.where} | `{r.key}` | {r.when} |" for r in TABLE]
    lines += ["", "Also said at run time: `align eval --generate` with a reward-model target (a reward model",
              "does not generate: it is left out of the answers, and its preference metrics still count).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
