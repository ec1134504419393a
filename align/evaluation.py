"""`align eval`: what did alignment change? Base and adapters side by side, on ONE base.

Targets are run folders, adapter folders or exported (adapter or merged) models. Every adapter
goes onto one copy of the base as a role (:class:`align.roles.Roles`); a merged export is a
model of its own.

- **Preferences** (``--data``): through the packed scorer, at full length unless ``--max-length``
  says otherwise (and then the cut is reported): a causal adapter's implicit-reward accuracy and
  margin, beta * (log pi - log pi_base); a reward model's pairwise accuracy; anyone's
  reference-free accuracy (mean per-token log-prob of chosen vs rejected). Ties count 1/2.
- **Generation** (``--generate``): the same held-out prompts answered by the base and every
  adapter from one vLLM engine (on a GPU the adapters as LoRA requests in one batch, on a CPU
  each merged into the engine's weights in turn: :func:`adapters_as_resolved`), each answer
  scored by a judge (any reward kind), KL to the base per answer (trainer-side), answer lengths,
  and win rates against the base with 95% CIs -- also with the judge's dependence on length
  taken out (a longer answer is not a better one).

Writes ``eval.json`` and a self-contained ``report.html`` (:mod:`align.report`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .artifacts import resolve
from .scoring.pairs import NO_LIMIT


class EvalError(ValueError):
    """A target or option `align eval` cannot use; the message names it."""


def load_targets(texts: list[str], base_override: str | None, device: str = "auto", dtype: str = "auto"):
    """(targets, Roles on their common base with every adapter loaded by target name, tokenizer)."""
    from .assets import resolve_model
    from .config import LoraConfig, ModelConfig
    from .models import load_base
    from .roles import Roles

    targets = [resolve(t) for t in texts]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        for i, t in enumerate(targets):
            t.name = f"{i}:{t.name}"
    adapters = [t for t in targets if t.kind != "merged"]
    bases = {resolve_model(base_override or t.base) for t in adapters}
    if len(bases) > 1:
        raise EvalError(f"the adapters sit on different bases ({', '.join(sorted(bases))}); evaluate them separately")
    base_name = base_override or (adapters[0].base if adapters else targets[0].base)
    from .placement import standalone_dtype

    base, tok = load_base(ModelConfig(name=base_name, device=device, dtype=standalone_dtype(dtype, device)))
    roles = Roles(base, LoraConfig(r=1, alpha=1))
    for t in adapters:
        roles.add_scorer(t.name, t.path)
    return targets, roles, tok, base_name


# -- preferences ------------------------------------------------------------------------


def preference_metrics(targets, roles, tok, pairs: list[dict], max_length: int, batch_size: int = 8,
                       reference_cache: str = "off") -> dict:
    """Per target (and the base): accuracies on tokenized ``pairs`` through the packed scorer;
    under ``per_pair``, each adapter's marks per pair (paired intervals between adapters). The
    base's scores go through the reference store (``reference_cache``, as ``train.reference_cache``)."""
    import dataclasses

    from .dpo.reference_store import scores_through
    from .models import load_base
    from .scoring.pairs import (PackedPairCollator, PairScores, implicit_reward_metrics, install_packed_forward,
                                normalized_margin_accuracy, pair_scores, pairwise_metrics, per_pair_marks,
                                reference_free_accuracy, score_pairs, truncation_report)

    limit = max_length or NO_LIMIT  # truncated as DPO trains: the prompt at most half, its last tokens
    collator = PackedPairCollator(tok.pad_token_id, limit, max(1, limit // 2) if max_length else NO_LIMIT - 1)
    cut = truncation_report(_columns(pairs), limit, collator.max_prompt_length)
    install_packed_forward(roles.lm())
    with roles.role("reference"):
        found, said, _ = scores_through(reference_cache, roles.model, pairs, collator, batch_size, lambda: dataclasses.asdict(
            score_pairs(roles.model, pairs, collator, batch_size, desc="base")))
    ref = PairScores(**found)
    table = {"base": {"kind": "base", "reference_free_accuracy": reference_free_accuracy(ref)}}
    per_pair = {}
    for t in targets:
        if t.kind == "reward":
            scorer = _RewardPairs(roles, t.name)
            table[t.name] = {"kind": "reward model", **pairwise_metrics(pair_scores(scorer, pairs, collator, batch_size))}
            continue
        if t.kind == "merged":
            merged, _ = load_base(_beside(roles, str(t.path)))
            install_packed_forward(merged)
            scores = score_pairs(merged, pairs, collator, batch_size, desc=t.name)
            table[t.name] = {"kind": "merged model", "reference_free_accuracy": reference_free_accuracy(scores)}
            continue
        with roles.role(t.name):
            scores = score_pairs(roles.model, pairs, collator, batch_size, desc=t.name)
        table[t.name] = {"kind": f"{t.job or 'causal'} adapter", "beta": t.beta,
                         **implicit_reward_metrics(scores, ref, t.beta),
                         "normalized_margin_accuracy": normalized_margin_accuracy(scores, ref),
                         "reference_free_accuracy": reference_free_accuracy(scores)}
        per_pair[t.name] = per_pair_marks(scores, ref)
    return {"pairs": len(pairs), "max_length": max_length or "untruncated",
            "truncated": {k: cut[k] for k in ("prompt_truncated", "answer_truncated")}, "table": table,
            "reference_cache": said, "per_pair": per_pair}


def _beside(roles, name: str):
    """A model config for ``name`` placed where the roles' base is (device and dtype)."""
    from .config import ModelConfig
    from .placement import placement_of

    where = placement_of(roles.model)
    return ModelConfig(name=name, device=str(where.device), dtype=where.dtype)


def _columns(pairs):
    return {k: [p[k] for p in pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


class _RewardPairs(torch.nn.Module):
    """A reward-model role, called the way :func:`align.scoring.pairs.pair_scores` calls a classifier."""

    def __init__(self, roles, name: str):
        super().__init__()
        self.roles, self.name = roles, name

    @property
    def device(self):
        return self.roles.device

    def forward(self, **batch):
        from .scoring.pairs import answer_end_states

        with self.roles.role(self.name):
            states = answer_end_states(self.roles.lm(), batch)
        return self.roles.score_head(self.name)(states.float()).squeeze(-1)


# -- generation -------------------------------------------------------------------------


ADAPTERS_AS = ("auto", "lora", "merged")


def adapters_as_resolved(choice: str, device=None) -> str:
    """How one vLLM engine runs many adapters. ``lora``: every adapter a LoRA request in one
    batch (Punica kernels: the way on a GPU). ``merged``: one adapter after another merged into
    the engine's weights (vLLM's CPU backend runs LoRA through plain torch ops that copy a
    LoRA weight per token: 3.3x slower there for the base + one adapter on 400 prompts, identical
    answers; docs/eval-serve.md). ``auto``: merged on a CPU, lora on a GPU."""
    if choice not in ADAPTERS_AS:
        raise EvalError(f"--adapters-as must be one of {', '.join(ADAPTERS_AS)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "lora" if device is not None and torch.device(device).type == "cuda" else "merged"


def generate_answers(targets, roles, tok, base_name: str, prompts: list[dict], max_new_tokens: int,
                     temperature: float, engine: str = "auto", seed: int = 0) -> dict:
    """{"base" | target name: completions}: the base and the causal adapters from one vLLM engine
    (``engine``: auto / lora / merged, :func:`adapters_as_resolved`), or transformers (``engine=
    "transformers"``, or vLLM unavailable: said so); merged models with transformers."""
    from .assets import resolve_model
    from .placement import ALONE_MEMORY_FRACTION, placement_of
    from .rollout import vllm_available
    from .rollout.base import SamplingConfig
    from .rollout.hf import HFEngine

    where = placement_of(roles.model)  # engines run where the scoring base runs, in its dtype
    params = SamplingConfig(max_new_tokens, temperature if temperature > 0 else 1.0, 1.0, seed=seed,
                            greedy=temperature == 0)
    ids = [p["ids"] for p in prompts]
    gen = [t for t in targets if t.kind == "adapter"]
    out, how, start = {}, "transformers", 0.0
    max_len = max(len(i) for i in ids) + max_new_tokens + 8
    use_vllm = engine != "transformers" and vllm_available()
    if use_vllm and gen and adapters_as_resolved(engine, where.device) == "merged":
        from .rollout.vllm_engine import EngineStartError, MergedSyncUnsupported, VLLMEngine

        try:
            t0 = time.time()
            vllm = VLLMEngine(resolve_model(base_name), tok, sync="merged", seed=seed, max_model_len=max_len,
                              base_name=base_name, dtype=where.dtype, device=str(where.device),
                              memory_fraction=ALONE_MEMORY_FRACTION)
            start = time.time() - t0
            try:
                out["base"] = vllm.generate(ids, params)
                for t in gen:
                    vllm.serve_merged(roles.model, roles.adapter_of(t.name))
                    out[t.name] = vllm.generate(ids, params)
            finally:
                vllm.close()
            how = "one vLLM engine: the base, then each adapter merged into its weights in turn"
        except (EngineStartError, MergedSyncUnsupported) as e:
            print(f"notice: {e}; running the adapters as LoRA requests instead")
            out = {}
    if use_vllm and not out:
        from .rollout.vllm_engine import EngineStartError, MultiAdapterEngine

        try:
            t0 = time.time()
            multi = MultiAdapterEngine(resolve_model(base_name), tok, {t.name: str(t.path) for t in gen},
                                       max_model_len=max_len, seed=seed, dtype=where.dtype, device=str(where.device))
            start = time.time() - t0
            try:
                res = multi.generate(ids, params, [None] + [t.name for t in gen])
            finally:
                multi.close()
            out = {("base" if k is None else k): v for k, v in res.items()}
            how = "one vLLM engine: the base and every adapter in one batch"
        except EngineStartError as e:
            print(f"notice: {e}; generating with transformers instead")
    if not out:
        engine = HFEngine(roles.model, tok)
        with roles.role("reference"):
            out["base"] = engine.generate(ids, params)
        for t in gen:
            with roles.role(t.name):
                out[t.name] = engine.generate(ids, params)
    for t in targets:
        if t.kind == "merged":
            from .models import load_base

            merged, _ = load_base(_beside(roles, str(t.path)))
            out[t.name] = HFEngine(merged, tok).generate(ids, params)
    return {"answers": out, "how": how, "engine_start_seconds": start}


def kl_to_base(roles, tok, name: str, comps, batch_size: int = 8) -> list[float]:
    """Per answer: sum over its tokens of log pi_adapter - log pi_base (the answers are the
    adapter's own samples, so the mean estimates KL(adapter || base)) -- the adapter's implicit
    reward at beta = 1, so the same scorer as a ``dpo`` judge."""
    from .scorers import AdapterReward

    return AdapterReward(roles, tok, name, "dpo", 1.0, Path(name), batch_size)(
        None, None, prompt_ids=[c.prompt_ids for c in comps], completion_ids=[c.token_ids for c in comps],
        truncated=[not c.finished for c in comps])


def compare(answers: dict, judge_scores: dict, kls: dict) -> dict:
    """Per target against the base: win rate (ties 1/2) with a 95% CI, mean judge score, mean
    KL, mean length, and the win rate once the judge's linear dependence on answer length (fit
    on every answer of the base and the targets) is taken out."""
    from .scoring.stats import length_slope, win_rate

    lengths = {k: [len(c.token_ids) for c in v] for k, v in answers.items()}
    xs = [n for k in answers for n in lengths[k]]
    slope = length_slope(xs, [s for k in answers for s in judge_scores[k]])
    mx = sum(xs) / len(xs)
    adjusted = {k: [s - slope * (n - mx) for s, n in zip(judge_scores[k], lengths[k])] for k in answers}

    out = {"base": {"judge_mean": sum(judge_scores["base"]) / len(judge_scores["base"]),
                    "length_mean": sum(lengths["base"]) / len(lengths["base"])},
           "judge_per_token_of_length": slope}
    for k in answers:
        if k == "base":
            continue
        m, ci = win_rate(judge_scores[k], judge_scores["base"])
        lm, lci = win_rate(adjusted[k], adjusted["base"])
        out[k] = {"win_rate": m, "win_rate_ci95": ci, "length_controlled_win_rate": lm,
                  "length_controlled_ci95": lci, "judge_mean": sum(judge_scores[k]) / len(judge_scores[k]),
                  "length_mean": sum(lengths[k]) / len(lengths[k]),
                  "kl_to_base_mean": (sum(kls[k]) / len(kls[k])) if k in kls else None}
    return out


def run_eval(targets: list[str], *, data: str | None = None, subsets: list[str] = (), split: str = "train",
             pairs: int = 500, rows: str = "all", max_length: int = 0, generate: bool = False, prompts: str | None = None,
             prompt_subsets: list[str] = (), num_prompts: int = 64, max_new_tokens: int = 64,
             temperature: float = 0.0, judge: str | None = None, out: str = "eval-report", base: str | None = None,
             use_vllm: bool = True, seed: int = 0, prompt_list: list[dict] | None = None, log=print,
             dry_run: bool = False, accuracy: str | None = None, answer_field: str = "answer",
             difficulty_field: str = "difficulty", adapters_as: str = "auto", device: str = "auto",
             dtype: str = "auto", reference_cache: str = "auto") -> dict:
    """Check every option and the output folder first (nothing loads before they pass), then
    evaluate. ``dry_run``: also find the targets, data, prompts and judge, then stop."""
    from .atomic import check_out_path
    from .guards import stop_on_signals

    if not data and not generate and not accuracy:
        raise EvalError("nothing to evaluate: give --data (preference pairs), --generate --prompts and/or "
                        "--accuracy (prompts with reference answers)")
    if generate and not ((prompts or prompt_list) and judge):
        raise EvalError("--generate needs --prompts (a prompt dataset) and --judge (a reward model, DPO adapter or function)")
    for flag, value, low in (("--pairs", pairs, 0), ("--max-length", max_length, 0), ("--num-prompts", num_prompts, 1),
                             ("--max-new-tokens", max_new_tokens, 1), ("--temperature", temperature, 0)):
        if not value >= low:  # NaN too
            raise EvalError(f"{flag} must be >= {low}, got {value}")
    adapters_as_resolved(adapters_as)
    try:
        from .dpo.reference_store import store_folder

        store_folder(reference_cache, "--reference-cache")
        out_dir = check_out_path(Path(out))
    except ValueError as e:
        raise EvalError(str(e)) from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EvalError(f"output folder '{out_dir}' exists and is not empty")
    graded = (accuracy, answer_field, difficulty_field) if accuracy else None
    if dry_run:
        return _check_eval_sources(targets, data, subsets, split, pairs, rows, generate, prompts, prompt_subsets,
                                   judge, out_dir, seed, log, graded)
    engine = adapters_as if use_vllm else "transformers"
    with stop_on_signals(f"nothing was written to '{out_dir}'"):
        return _run_eval(targets, data, subsets, split, pairs, rows, max_length, generate, prompts, prompt_subsets,
                         num_prompts, max_new_tokens, temperature, judge, out_dir, base, engine, seed,
                         prompt_list, log, graded, (device, dtype), reference_cache)


def _load_pairs(data, subsets, split, pairs, seed, rows, log) -> list[dict]:
    """``--data``'s pairs (before any model loads); none usable is an error naming the file."""
    from .data import load_preference_split

    kept, report = load_preference_split(data, list(subsets), split, pairs, False, seed, rows)
    log(f"pairs: {report.summary()}" + (f"; {len(kept)} of {rows}" if rows != "all" else ""))
    if not kept:
        raise EvalError(f"--data {data}: no usable preference pairs ({report.summary()}"
                        + (f"; e.g. {report.examples[0]}" if report.examples else "") + ")")
    return kept


def _graded_prompts(graded, seed: int) -> list[dict]:
    """``--accuracy``'s prompts that carry ``--answer-field`` (before any model loads); none is an error."""
    from .config import PromptDataConfig
    from .data.prompts import load_heldout
    from .verifiable import graded as with_answers

    source, answer_field, _ = graded
    rows = with_answers(load_heldout(source, PromptDataConfig(dataset=source, eval_prompts=0, seed=seed)), answer_field)
    if not rows:
        raise EvalError(f"--accuracy {source}: no prompt carries the field '{answer_field}' (--answer-field)")
    return rows


def _accuracy(tlist, roles, tok, base_name, rows, graded, max_new_tokens, engine, seed, log) -> tuple[dict, list]:
    """Greedy accuracy of the base and every adapter on the same graded prompts, and each
    adapter's paired difference from the base."""
    from .chat import encode_prompts
    from .scoring.stats import paired_difference
    from .verifiable import GRADERS, greedy_report

    source, answer_field, difficulty_field = graded
    te = time.time()
    encode_prompts(tok, rows, 1024)
    gen = generate_answers(tlist, roles, tok, base_name, rows, max_new_tokens, 0.0, engine, seed)
    out = {"prompts": source, "n": len(rows), "engine": gen["how"], "max_new_tokens": max_new_tokens, "models": {}}
    marks = {}
    for name, comps in gen["answers"].items():
        out["models"][name], marks[name] = greedy_report(rows, comps, answer_field, difficulty_field)
    for name in out["models"]:
        if name != "base":
            out["models"][name]["vs_base"] = {g: paired_difference([m[g] for m in marks["base"]], [m[g] for m in marks[name]])
                                              for g in GRADERS}
        m = out["models"][name]
        log(f"accuracy {name}: strict {100 * m['strict']:.1f} %, lenient {100 * m['lenient']:.1f} % "
            f"[{100 * m['lenient_ci95'][0]:.1f}, {100 * m['lenient_ci95'][1]:.1f}] on {len(rows)} prompts")
    out["seconds"] = round(time.time() - te, 1)
    samples = [{"prompt": s["prompt"], "answer": s["answer"], "difficulty": s["difficulty"],
                **{name: {"completion": marks[name][i]["completion"], **{g: marks[name][i][g] for g in GRADERS}}
                   for name in marks}} for i, s in enumerate(marks["base"])]
    return out, samples


def _check_eval_sources(targets, data, subsets, split, pairs, rows, generate, prompts, prompt_subsets, judge,
                        out_dir, seed, log, graded=None) -> dict:
    """`align eval --dry-run`: every target, the pairs, the prompts and the judge can be found
    and read; no model is loaded and nothing is written."""
    from .config import PromptDataConfig
    from .scorers import section_of

    found = [resolve(t) for t in targets]
    plan = {"targets": [f"{t.name} ({t.kind} on {t.base})" for t in found], "out": str(out_dir)}
    if data:
        plan["pairs"] = len(_load_pairs(data, subsets, split, pairs, seed, rows, lambda m: None))
    if graded:
        plan["accuracy_prompts"] = len(_graded_prompts(graded, seed))
    if generate:
        from .data.prompts import load_prompts

        if prompts:
            plist, _ = load_prompts(PromptDataConfig(dataset=prompts, subsets=list(prompt_subsets), eval_prompts=0,
                                                     seed=seed))
            plan["prompts"] = len(plist)
        section = section_of(judge)
        if section.kind == "function":
            from reward.api import load_reward_fn

            load_reward_fn(section.function)
        elif resolve(section.adapter, what=f"--judge {judge}:").kind == "merged":
            raise EvalError(f"--judge {judge}: '{section.adapter}' is neither an adapter folder nor a run folder")
        plan["judge"] = judge
    log("dry run: " + json.dumps(plan) + "; nothing was loaded or written")
    return plan


def _run_eval(targets, data, subsets, split, pairs, rows, max_length, generate, prompts, prompt_subsets,
              num_prompts, max_new_tokens, temperature, judge, out_dir, base, engine, seed, prompt_list, log,
              graded=None, placed=("auto", "auto"), reference_cache: str = "auto"):
    from .atomic import atomic_dir
    from .chat import tokenize_pair
    from .report import write_report

    t0 = time.time()
    for t in targets:  # cheap checks before the model loads: targets, then the data
        resolve(t)
    kept = _load_pairs(data, subsets, split, pairs, seed, rows, log) if data else []
    graded_rows = _graded_prompts(graded, seed) if graded else []
    tlist, roles, tok, base_name = load_targets(targets, base, *placed)
    roles.eval()
    from .placement import placement_of

    result = {"placement": placement_of(roles.model).record(), "targets": [{"name": t.name, "path": str(t.path), "kind": t.kind, "job": t.job, "base": t.base}
                          for t in tlist], "base": base_name}
    if data:
        te = time.time()
        result["preferences"] = preference_metrics(tlist, roles, tok, [tokenize_pair(tok, r) for r in kept], max_length,
                                                   reference_cache=reference_cache)
        result["preferences"].update(data=data, subsets=list(subsets), rows=rows, seconds=round(time.time() - te, 1))
        per_pair = result["preferences"].pop("per_pair")
    if generate:
        result["generation"] = _generation(tlist, roles, tok, base_name, prompts, list(prompt_subsets), num_prompts,
                                           max_new_tokens, temperature, judge, engine, seed, prompt_list)
    graded_samples = []
    if graded:
        result["accuracy"], graded_samples = _accuracy(tlist, roles, tok, base_name, graded_rows, graded,
                                                       max_new_tokens, engine, seed, log)
    result["seconds"] = round(time.time() - t0, 1)
    with atomic_dir(out_dir) as tmp:
        if data:  # each adapter's mark per pair, in the pairs' order: paired intervals between runs
            (tmp / "preferences_per_pair.json").write_text(json.dumps(per_pair))
        if graded_samples:
            (tmp / "accuracy_answers.jsonl").write_text("".join(json.dumps(s) + "\n" for s in graded_samples))
        samples = result.get("generation", {}).pop("samples", [])
        (tmp / "eval.json").write_text(json.dumps(result, indent=2))
        write_report(result, samples, tmp / "report.html")
        if samples:
            (tmp / "answers.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    log(f"eval: {out_dir / 'eval.json'}, {out_dir / 'report.html'} ({result['seconds']:.0f} s)")
    return result


def _generation(tlist, roles, tok, base_name, prompts, prompt_subsets, num_prompts, max_new_tokens, temperature,
                judge, engine, seed, prompt_list=None) -> dict:
    from .chat import encode_prompts
    from .config import PromptDataConfig, RewardConfig
    from .data.prompts import load_prompts
    from .scorers import score_completions
    from .scorers import make_reward, section_of

    for t in tlist:
        if t.kind == "reward":
            print(f"note: '{t.name}' is a reward model: it does not generate, so --generate leaves it out")
    te = time.time()
    if prompt_list is None:
        prompt_list, _ = load_prompts(PromptDataConfig(dataset=prompts, subsets=prompt_subsets, eval_prompts=0, seed=seed))
    plist = [{"messages": p["messages"], "source": p.get("source", "")} for p in prompt_list[:num_prompts]]
    encode_prompts(tok, plist, 1024)
    phases = {"prompts": time.time() - te}
    gen = generate_answers(tlist, roles, tok, base_name, plist, max_new_tokens, temperature, engine, seed)
    phases.update(engine_start=gen["engine_start_seconds"], judge=0.0, kl=0.0)
    phases["generate"] = time.time() - te - phases["prompts"] - phases["engine_start"]
    judge_fn = make_reward(section_of(judge), roles, tok, "judge", base_name)
    scores, kls = {}, {}
    for name, comps in gen["answers"].items():
        t1 = time.time()
        scores[name] = score_completions(judge_fn, plist, comps, RewardConfig(kind="function"), penalize=False).tolist()
        phases["judge"] += time.time() - t1
        if name != "base" and any(t.name == name and t.kind == "adapter" for t in tlist):
            t1 = time.time()
            kls[name] = kl_to_base(roles, tok, name, comps)
            phases["kl"] += time.time() - t1
    samples = [{"prompt": p["messages"], **{name: {"answer": gen["answers"][name][i].text,
                                                  "judge": scores[name][i], "tokens": len(gen["answers"][name][i].token_ids)}
                                            for name in gen["answers"]}} for i, p in enumerate(plist)]
    return {"prompts": prompts, "prompt_subsets": prompt_subsets, "n": len(plist), "judge": judge,
            "engine": gen["how"], "max_new_tokens": max_new_tokens, "temperature": temperature,
            "comparison": compare(gen["answers"], scores, kls), "seconds": round(time.time() - te, 1),
            "seconds_by_phase": {k: round(v, 1) for k, v in phases.items()},
            "samples": samples}


def report_after_job(cfg, run_path: Path, held_out=None) -> str:
    """``eval.generate``: the job's adapter against its base on held-out prompts (``eval.prompts``,
    else the job's own: ``held_out`` prompts, or ``data.dataset``'s held-out subsets); the
    report's path. Jobs reach it through :data:`align.runs.AFTER_JOB`, importing no eval code."""
    ev = cfg.eval
    out = run_path / "eval-report"
    run_eval([str(run_path)], generate=True, prompts=ev.prompts or cfg.data.dataset,
             prompt_subsets=ev.prompt_subsets or cfg.data.eval_subsets, num_prompts=ev.num_prompts,
             max_new_tokens=ev.max_new_tokens, judge=ev.judge, out=str(out), seed=cfg.run.seed,
             prompt_list=None if ev.prompts else held_out, device=cfg.model.device)
    return str(out / "report.html")
