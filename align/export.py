"""`align export`: the trained adapter out as a standard PEFT folder (and a merged model on
request), verified after writing.

Failures users hit elsewhere and that this guards against: adapter configs that no longer load
(a mirror path or a wrong base id, ``lora_alpha: 0``), merged models that drift because the merge
ran in bf16, a half-written output folder, and an adapter silently put onto another base.
Everything is written to a temp folder beside ``--out``, verified there (vLLM included), and
renamed into place at the end; a signal on the way removes the temp folder and ends the vLLM
check's processes, so ``--out`` holds either the verified export or what it held before.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .adapters import AdapterError, check_weights, load_with_adapter, set_base_name
from .artifacts import Artifact, ArtifactError, resolve
from .atomic import atomic_dir, atomic_write_text
from .chat import prompt_ids
from .scoring.logprobs import next_token_logprobs

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VERIFY_PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Write a short sentence about the sea.",
]
from .placement import DTYPES as _DTYPES, MERGE_DTYPE  # noqa: E402


class ExportError(ValueError):
    """A problem with the source, the base or the output folder; the message names it."""


def find_source(path: str | Path, checkpoint: str = "final", base: str | None = None) -> Artifact:
    """The adapter to export: a run folder (its final adapter or ``checkpoint``), one of its
    checkpoints, or a bare PEFT adapter folder (:func:`align.artifacts.resolve`)."""
    try:
        src = resolve(path, checkpoint, what="source")
    except ArtifactError as e:
        raise ExportError(str(e)) from None
    if src.kind == "merged" and src.run_dir is not None:
        raise ExportError(f"'{path}' is a full fine-tuning run (lora.r=full): its '{src.path}' is a transformers "
                          "model folder already (AutoModelForCausalLM.from_pretrained loads it); nothing to export")
    if src.kind == "merged":
        raise ExportError(f"'{path}' is a model folder, not a run or an adapter: nothing to export")
    for name in ADAPTER_FILES:
        f = src.path / name
        if not f.is_file():
            raise ExportError(f"adapter file '{f}' is missing")
    src.base = base or src.base
    if not src.base:
        raise ExportError(f"{src.path / 'adapter_config.json'}: no base_model_name_or_path; pass --base")
    return src


@torch.no_grad()
def prompt_logprobs(model, tok, prompts=VERIFY_PROMPTS) -> list[torch.Tensor]:
    """Next-token log-probs over each chat-formatted prompt (fp32), for parity checks."""
    return [next_token_logprobs(model(input_ids=torch.tensor([prompt_ids(tok, p)], device=model.device)).logits[0]).cpu()
            for p in prompts]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _top1_agreement(a, b) -> float:
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    return same / sum(x.shape[0] for x in a)


def model_card(src: Artifact, merged: bool, dtype: str) -> str:
    rc = src.config or {}
    method = {"ppo": "PPO", "dpo": "DPO", "rm": "RM"}.get(src.job, "unknown")
    lora, data = rc.get("lora", {}), rc.get("data", {})
    what = "Merged model" if merged else "LoRA adapter"
    lines = [
        "---", f"base_model: {src.base}", f"library_name: {'transformers' if merged else 'peft'}",
        f"tags: [align, lora, {method.lower()}{', merged' if merged else ''}]", "---", "",
        f"# {what} for {src.base} ({method}, trained with align)", "",
        f"- **Base model:** `{src.base}`",
        f"- **LoRA:** r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
        f"targets={lora.get('target_modules')}",
    ]
    if method == "DPO":
        t = rc.get("train", {})
        lines += [f"- **Method:** DPO, beta {t.get('beta')}, loss {t.get('loss_type')}",
                  f"- **Data:** {data.get('dataset')}, train subsets {data.get('train_subsets')}, "
                  f"up to {data.get('max_train_pairs')} pairs",
                  f"- **Optimisation:** lr {t.get('learning_rate')}, batch {t.get('batch_size')}, "
                  f"epochs {t.get('epochs')}, max length {t.get('max_length')}"]
    elif method == "PPO":
        p, r = rc.get("ppo", {}), rc.get("reward", {})
        lines += [f"- **Method:** PPO ({p.get('advantage')} advantages), KL coef {p.get('kl_coef')}",
                  f"- **Reward:** `{r.get('function')}`",
                  f"- **Prompts:** {data.get('dataset')} (field `{data.get('text_field')}`)",
                  f"- **Optimisation:** lr {p.get('learning_rate')}, {p.get('prompts_per_iteration')} prompts x "
                  f"{p.get('samples_per_prompt')} samples per iteration, {p.get('ppo_epochs')} PPO epochs"]
    if merged:
        lines.append(f"- **This folder:** the adapter merged into the base (merged in float32, saved as {dtype})")
    ev = src.held_out()
    if ev and "implicit_accuracy" in ev:
        lines += ["", "## Held-out evaluation", "", f"On {ev.get('pairs')} pairs of {ev.get('eval_subsets')} "
                  "(never trained on):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {ev[k]:.4f} |" for k in ("implicit_accuracy", "mean_margin",
                  "reference_free_accuracy_base", "reference_free_accuracy_policy") if k in ev]
    elif ev and "eval_final" in ev:
        lines += ["", "## Held-out evaluation", ""] + _ppo_eval_rows(ev)
    lines += ["", "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if merged:  # a full model: no PEFT, no base needed
        lines += ["model = AutoModelForCausalLM.from_pretrained('PATH_TO_THIS_FOLDER')",
                  "tok = AutoTokenizer.from_pretrained('PATH_TO_THIS_FOLDER')", "```", "",
                  "The LoRA adapter it was merged from is in `adapter/`.", ""]
    else:
        lines += ["from peft import PeftModel",
                  f"base = AutoModelForCausalLM.from_pretrained('{src.base}')",
                  "model = PeftModel.from_pretrained(base, 'PATH_TO_THIS_FOLDER')", "```", ""]
    if src.config:
        lines += ["The full training config is in `training_config.yaml`.", ""]
    return "\n".join(lines)


def _refuse_overlap(out: Path, sources: list[Path]) -> None:
    """``--out`` must never be, contain, or sit inside the source: replacing it would delete
    the run (metrics, checkpoints, the adapter being exported) -- ``--force`` or not."""
    o = out.resolve()
    for src in sources:
        s = Path(src).resolve()
        if o == s or s in o.parents or o in s.parents:
            raise ExportError(f"--out '{out}' overlaps the source '{src}' (it is, contains or sits inside "
                              "it); export to a folder outside the run")


def export(source: str | Path, out: str | Path, *, merge: bool = False, dtype: str | None = None,
           checkpoint: str = "final", verify: bool = True, force: bool = False,
           base: str | None = None, vllm_check: bool = True, log=print, dry_run: bool = False,
           device: str = "auto") -> dict:
    """Write ``source``'s adapter (a run folder or an adapter folder) to ``out``, verified.
    ``dry_run``: check the source, its weights and ``out``, say what would be written, stop."""
    from .guards import stop_on_signals

    try:
        with stop_on_signals(f"nothing was published at '{out}' (what was there before is unchanged)"):
            return _export(source, out, merge=merge, dtype=dtype, checkpoint=checkpoint, verify=verify,
                           force=force, base=base, vllm_check=vllm_check, log=log, dry_run=dry_run,
                           device=device)
    except AdapterError as e:
        raise ExportError(str(e)) from e


def _export(source, out, *, merge, dtype, checkpoint, verify, force, base, vllm_check, log, dry_run=False,
            device="auto") -> dict:
    from .atomic import check_out_path

    try:
        out = check_out_path(Path(out))
    except ValueError as e:
        raise ExportError(str(e)) from None
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(_DTYPES)}, got '{dtype}'")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"output folder '{out}' exists and is not empty (use --force to replace it)")
    src = find_source(source, checkpoint, base)
    if dtype is None:  # the merged model in the dtype the run trained in
        from .runs import read_manifest

        dtype = (read_manifest(src.run_dir).get("dtype") if src.run_dir else None) or MERGE_DTYPE
    _refuse_overlap(out, [d for d in (src.run_dir, src.path) if d is not None])
    check_weights(src.path)
    report: dict = {"source": str(src.path), "base": src.base, "out": str(out)}
    if dry_run:
        report["would_write"] = f"{'a merged model (' + dtype + ')' if merge else 'a PEFT adapter'}, verified"
        log("dry run: " + json.dumps(report) + "; nothing was loaded or written")
        return report

    # Load once: this fails early, before anything is written, on a mismatched base.
    # The merge and its checks run in MERGE_DTYPE (whatever dtype is saved), on this process's device.
    model, tok = load_with_adapter(src.base, src.path, dtype=MERGE_DTYPE, device=device)
    ref_logps = prompt_logprobs(model, tok) if verify else None

    with atomic_dir(out) as tmp:
        adapter_out = tmp if not merge else tmp / "adapter"
        adapter_out.mkdir(exist_ok=True)
        for name in ADAPTER_FILES:
            shutil.copy2(src.path / name, adapter_out / name)
        set_base_name(adapter_out, src.base, inference_mode=True)  # the id users know
        card = model_card(src, merged=merge, dtype=dtype)
        atomic_write_text(tmp / "README.md", card)
        if src.run_dir is not None:
            shutil.copy2(src.run_dir / "config.yaml", tmp / "training_config.yaml")
        if verify:
            exported, _ = load_with_adapter(src.base, adapter_out, dtype=MERGE_DTYPE, device=device)
            diff = _max_diff(ref_logps, prompt_logprobs(exported, tok))
            report["adapter_max_logprob_diff"] = diff
            if diff > 1e-5:
                raise ExportError(f"verification failed: exported adapter differs from the run's "
                                  f"(max |d log p| = {diff:.2e})")
            del exported
        if merge:
            _write_merged(model, tok, tmp, dtype, ref_logps, report)
        if verify and vllm_check:  # in the temp folder: --out only ever gets a verified export
            vllm = _verify_in_vllm(tmp, src.base, merge, tok, dtype, device)
            if vllm is not None:
                report["vllm"] = vllm
    log(json.dumps(report, indent=2))
    return report


def _write_merged(model, tok, folder: Path, dtype: str, ref_logps, report: dict) -> None:
    """Merge in fp32, check the merge there (|d log p| <= 1e-3 against adapter-on-base), then
    save in ``dtype``. A bf16/fp16 model cannot match fp32 log-probs closely -- rounding the
    *base* alone to bf16 moves some log-probs by ~1 nat -- so the saved file is checked to hold
    exactly the verified fp32 merge rounded to ``dtype``, and its log-prob gap is reported."""
    merged = model.merge_and_unload()  # the model was loaded in fp32
    if ref_logps is not None:
        diff = _max_diff(ref_logps, prompt_logprobs(merged, tok))
        report["merged_fp32_max_logprob_diff"] = diff
        if diff > 1e-3:
            raise ExportError(f"verification failed: the fp32 merge differs from adapter-on-base "
                              f"(max |d log p| {diff:.2e} > 1e-3)")
    merged = merged.to(_DTYPES[dtype])
    merged.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    if ref_logps is None:
        return
    reloaded, _ = load_with_adapter(str(folder), dtype=dtype, device=str(model.device))
    saved, expected = reloaded.state_dict(), merged.state_dict()
    wrong = [k for k, v in expected.items() if k not in saved or not torch.equal(saved[k], v)]
    if wrong:
        raise ExportError(f"verification failed: the saved {dtype} weights are not the verified merge "
                          f"(e.g. '{wrong[0]}')")
    got = prompt_logprobs(reloaded, tok)
    diff, agree = _max_diff(ref_logps, got), _top1_agreement(ref_logps, got)
    report.update(merged_max_logprob_diff=diff, merged_top1_agreement=agree,
                  merged_tolerance="fp32: max |d log p| <= 1e-3 and identical top-1" if dtype == "float32" else
                  f"{dtype}: fp32 merge within 1e-3, saved weights == that merge rounded to {dtype} "
                  "(bit-exact); log-prob gap reported, top-1 agreement >= 0.9")
    if (diff > 1e-3 or agree < 1.0) if dtype == "float32" else agree < 0.9:
        raise ExportError(f"verification failed: merged ({dtype}) differs from adapter-on-base "
                          f"(max |d log p| {diff:.2e}, top-1 agreement {agree:.3f})")


def _verify_in_vllm(out: Path, base_name: str, merged: bool, tok, dtype: str, device: str) -> dict | None:
    """Where vLLM is installed, load the export there and compare greedy decoding with HF.
    A merged export is checked as a full model; an adapter as base + LoRARequest."""
    from .rollout import vllm_available

    if not vllm_available():
        return None
    from .rollout.vllm_check import greedy_parity

    print("checking the export in vLLM: greedy decoding must equal transformers' (engine start "
          "~30 s on a CPU; --no-vllm-check skips)", flush=True)
    result = greedy_parity(out, base_name, merged=merged, prompts=VERIFY_PROMPTS, dtype=dtype, device=device)
    if not result["match"]:
        raise ExportError(f"verification failed: vLLM greedy decoding differs from transformers: "
                          f"{result['mismatches'][:1]}")
    return result


def _ppo_eval_rows(ev: dict) -> list[str]:
    """A PPO run's held-out table: sampled reward and KL where they were measured, graded greedy
    accuracy where the prompts carry answers; "before" only where iteration 0 was evaluated."""
    rows = [("before", ev["eval_initial"])] if "eval_initial" in ev else []
    rows.append(("after", ev["eval_final"]))
    cols = [(k, name, fmt) for k, name, fmt in (
        ("reward_mean", "reward mean", ".4f"), ("reward_std", "reward std", ".4f"), ("kl_per_answer", "KL per answer", ".2f"),
        ("accuracy_strict", "greedy accuracy (strict)", ".3f"), ("accuracy_lenient", "greedy accuracy (lenient)", ".3f"))
        if all(k in r for _, r in rows)]
    return [f"After iteration {ev['eval_final'].get('iteration', '?')}; before = the base"
            + (" (not evaluated in this run)" if len(rows) == 1 else "") + ".", "",
            f"| | {' | '.join(name for _, name, _ in cols)} |", "|---" * (len(cols) + 1) + "|"] + [
        f"| {label} | {' | '.join(format(r[k], fmt) for k, _, fmt in cols)} |" for label, r in rows]
