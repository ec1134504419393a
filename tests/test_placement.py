"""GPU bugs caught on a CPU (issue 40): the placement decision, a meta-device probe of every
scoring entry point, a lint for tensors made without a device where a model or a collective
consumes them, and the arguments of every vLLM engine align builds, with CUDA pretended."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from align.rollout.base import Completion

ROOT = Path(__file__).resolve().parents[1]


# -- the meta-device probe ------------------------------------------------------------------


class DeviceMismatch(AssertionError):
    """A module received an input on another device than its weights (on a GPU: a crash)."""


def _on_meta(module) -> list:
    """Weights to ``meta`` and a pre-hook on every submodule that raises :class:`DeviceMismatch`
    when a tensor input is elsewhere. A GPU's "Expected all tensors to be on the same device",
    reproduced on a CPU."""
    module.to("meta")

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)

    def check(mod, args, kwargs):
        for t in tensors((args, kwargs)):
            if t.device.type != "meta":
                raise DeviceMismatch(f"{type(mod).__name__} got a {tuple(t.shape)} input on {t.device}, "
                                     "its weights are on meta")

    return [m.register_forward_pre_hook(check, with_kwargs=True) for m in module.modules()]


def _probe(call) -> None:
    """Run ``call``; a DeviceMismatch fails the test, any later error of computing on meta
    (``.item()``, ``.tolist()``, data-dependent shapes) is outside the probe."""
    try:
        call()
    except DeviceMismatch:
        raise
    except Exception:  # noqa: BLE001 - meta tensors hold no values: later steps may fail
        pass


def _pairs(n=4):
    g = torch.Generator().manual_seed(0)
    r = lambda k: torch.randint(5, 90, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": r(6), "chosen_ids": r(4), "rejected_ids": r(3)} for _ in range(n)]


@pytest.fixture()
def fresh_base(tiny_model_path):
    from align.config import ModelConfig
    from align.models import load_base

    return load_base(ModelConfig(name=tiny_model_path, dtype="float32", device="cpu"))


@pytest.mark.parametrize("entry", ["score_pairs", "score_reference"])
def test_dpo_scoring_places_its_batches(entry, fresh_base):
    """DPO's reference pass (score_reference) and held-out scoring (score_pairs) on a model
    elsewhere than the collator's CPU tensors: on 84b20d5 the batch stayed on the CPU."""
    from align.config import LoraConfig
    from align.dpo.heldout import score_reference
    from align.models import add_policy_adapter
    from align.scoring.pairs import PackedPairCollator, install_packed_forward, score_pairs

    base, tok = fresh_base
    model = add_policy_adapter(base, LoraConfig(r=2))
    install_packed_forward(model.get_base_model())
    _on_meta(model)
    score = {"score_pairs": score_pairs, "score_reference": score_reference}[entry]
    _probe(lambda: score(model, _pairs(), PackedPairCollator(tok.pad_token_id, 64, 32), 2))


def test_reward_model_pair_scores_place_their_batches(tiny_model_path):
    from align.config import ModelConfig
    from align.models import load_base
    from align.scoring.pairs import PackedPairCollator, install_packed_scorer, pair_scores

    rm, tok = load_base(ModelConfig(name=tiny_model_path, dtype="float32", device="cpu"), kind="classifier")
    install_packed_scorer(rm)
    _on_meta(rm)
    _probe(lambda: pair_scores(rm, _pairs(), PackedPairCollator(tok.pad_token_id, 64, 32), 2))


class _FixedEngine:
    """Answers every prompt with the same tokens (the probe needs no real rollout)."""

    def generate(self, prompt_ids, params):
        return [Completion(list(p), [7, 8, 9], True, [-1.0, -1.0, -1.0], text="7 8 9") for p in prompt_ids]


def _ppo_cfg():
    from align.config import load_config

    return load_config("ppo", None, ["ppo.advantage=gae", "ppo.samples_per_prompt=2"])


def test_ppo_passes_place_their_batches(fresh_base, tiny_adapter):
    """The PPO policy/value pass, the Roles log-probs, the experience and held-out passes and a
    reward adapter: every batch they build goes where the roles are."""
    from align.config import LoraConfig
    from align.ppo.actor_critic import ActorCritic
    from align.ppo.advantages import get_estimator
    from align.ppo.experience import collate, make_experience
    from align.ppo.heldout import evaluate_prompts
    from align.rollout.base import SamplingConfig
    from align.scorers import AdapterReward

    base, tok = fresh_base
    ac = ActorCritic(base, LoraConfig(r=2), with_critic=True)
    ac.add_scorer("judge", tiny_adapter)
    _on_meta(ac)
    cfg = _ppo_cfg()
    comps = _FixedEngine().generate([[1, 2, 3], [4, 5, 6]], None)
    prompts = [{"messages": [{"role": "user", "content": "hi"}], "ids": [1, 2, 3]},
               {"messages": [{"role": "user", "content": "yo"}], "ids": [4, 5, 6]}]
    reward = lambda prompts, completions, **info: [1.0] * len(completions)  # noqa: E731
    tb = collate(comps, tok.pad_token_id, ac.device)
    _probe(lambda: ac.policy_pass(tb, with_entropy=True))
    _probe(lambda: ac.token_logprobs(tb))
    _probe(lambda: make_experience(ac, _FixedEngine(), tok, prompts, reward, cfg, get_estimator(cfg.ppo), 0.05,
                                   SamplingConfig(3, 1.0, 1.0)))
    _probe(lambda: evaluate_prompts(ac, _FixedEngine(), tok, prompts, reward, cfg, seed=0))
    judge = AdapterReward(ac, tok, "judge", "dpo", 0.1, Path(tiny_adapter))
    _probe(lambda: judge(None, None, prompt_ids=[[1, 2, 3]], completion_ids=[[7, 8]], truncated=[False]))


def test_the_probe_catches_a_cpu_batch(fresh_base):
    """The probe itself: a CPU tensor handed to a meta model is a DeviceMismatch."""
    base, _ = fresh_base
    _on_meta(base)
    with pytest.raises(DeviceMismatch):
        base(input_ids=torch.tensor([[1, 2, 3]]))


# -- the lint ------------------------------------------------------------------------------

CONSTRUCTORS = {"tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
                "randperm", "eye", "linspace"}
# Calls that mean "this function hands tensors to a model or a collective".
CONSUMERS = {"all_reduce", "all_sum", "all_gather", "broadcast", "reduce_scatter", "all_mean", "any_rank",
             "base_model", "model", "lm", "policy_pass", "token_logprobs", "hidden_at", "values",
             "last_token_scores", "generate", "forward", "score_pairs", "pair_scores", "states_at", "end_states"}
# function (path::name) -> why a constructor there needs no device
ALLOWED: dict[str, str] = {}


def _name(func) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def lint(paths) -> list[str]:
    """``torch.<constructor>(...)`` without ``device=`` in a function that also calls a model or
    a collective: on a GPU such a tensor is on the CPU where its consumer is not."""
    found = []
    for path in paths:
        tree = ast.parse(Path(path).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
            if not any(_name(c.func) in CONSUMERS for c in calls):
                continue
            key = f"{Path(path).relative_to(ROOT)}::{fn.name}"
            if key in ALLOWED:
                continue
            for c in calls:
                f = c.func
                if (isinstance(f, ast.Attribute) and f.attr in CONSTRUCTORS and isinstance(f.value, ast.Name)
                        and f.value.id == "torch" and not any(k.arg == "device" for k in c.keywords)):
                    found.append(f"{Path(path).relative_to(ROOT)}:{c.lineno} torch.{f.attr} in {fn.name}()")
    return found


def _sources():
    return sorted(p for d in ("align", "reward") for p in (ROOT / d).rglob("*.py"))


def test_no_tensor_without_a_device_where_a_model_or_collective_consumes_it():
    problems = lint(_sources())
    assert not problems, "tensors made without device= beside a model or collective call:\n" + "\n".join(problems)


def test_the_lint_flags_a_cpu_tensor_given_to_a_collective(tmp_path):
    """84b20d5's ppo/trainer.py:178, reduced: ``all_sum(torch.tensor(n))``."""
    bad = ROOT / "align" / "_lint_sample.py"
    bad.write_text("import torch\n\ndef record(exp, distributed):\n"
                   "    return int(distributed.all_sum(torch.tensor(exp.groups_skipped)))\n")
    try:
        assert lint([bad]) == ["align/_lint_sample.py:4 torch.tensor in record()"]
    finally:
        bad.unlink()


def test_every_allow_list_entry_has_a_reason_and_exists():
    for key, why in ALLOWED.items():
        path, _, name = key.partition("::")
        assert why.strip() and f"def {name}(" in (ROOT / path).read_text(), key


# -- vLLM arguments, with CUDA pretended ----------------------------------------------------


@pytest.fixture()
def pretend_cuda(monkeypatch):
    """torch says it has a bf16 GPU: align's decisions take the CUDA branch (nothing runs there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "pretend GPU")


class _Captured(Exception):
    pass


def _capture_llm(monkeypatch) -> list[dict]:
    import vllm

    seen = []

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.append(kwargs)
            raise _Captured

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    return seen


def _check(args: dict, lora: bool, where: str):
    assert args.get("gpu_memory_utilization") and 0 < args["gpu_memory_utilization"] < 1, where
    if lora:
        assert args.get("enable_lora") and args["dtype"] in ("bfloat16", "float16"), (where, args)


def _server_flags(flags: list[str]) -> dict:
    out, i = {}, 0
    while i < len(flags):
        key = flags[i].lstrip("-").replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            out[key] = flags[i + 1]
            i += 2
        else:
            out[key] = True
            i += 1
    out["gpu_memory_utilization"] = float(out.get("gpu_memory_utilization", 0))
    return out


def test_every_in_process_vllm_engine_on_cuda_is_never_fp32_with_lora(pretend_cuda, monkeypatch, tiny_model_path,
                                                                      tiny_adapter):
    from align.models import load_tokenizer
    from align.rollout import vllm_engine

    monkeypatch.setattr(vllm_engine, "_refuse_transformers_fallback", lambda *a: None)
    seen = _capture_llm(monkeypatch)
    tok = load_tokenizer(tiny_model_path)
    for sync in ("lora", "merged"):
        with pytest.raises(vllm_engine.EngineStartError):  # the fake LLM stops each start
            vllm_engine.VLLMEngine(tiny_model_path, tok, sync=sync, dtype="float32", device="cuda")
    with pytest.raises(vllm_engine.EngineStartError):
        vllm_engine.MultiAdapterEngine(tiny_model_path, tok, {"a": str(tiny_adapter)}, dtype="float32", device="cuda")
    assert len(seen) == 3
    _check(seen[0], True, "VLLMEngine lora")
    _check(seen[1], False, "VLLMEngine merged")
    assert seen[1]["dtype"] == "float32"  # no LoRA: the trainer's dtype
    _check(seen[2], True, "MultiAdapterEngine (eval)")
    assert not seen[0]["enforce_eager"]  # CUDA graphs on a GPU


def test_each_ranks_engine_on_its_own_gpu(pretend_cuda, monkeypatch, tiny_model_path):
    """With several trainer processes on CUDA, each in-process engine joins them through vLLM's
    external_launcher (its own GPU, LOCAL_RANK); on 84b20d5 every rank's engine took cuda:0."""
    from align.models import load_tokenizer
    from align.rollout import vllm_engine

    monkeypatch.setattr(vllm_engine, "_refuse_transformers_fallback", lambda *a: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = _capture_llm(monkeypatch)
    with pytest.raises(vllm_engine.EngineStartError):
        vllm_engine.VLLMEngine(tiny_model_path, load_tokenizer(tiny_model_path), dtype="bfloat16", device="cuda")
    assert seen[0]["distributed_executor_backend"] == "external_launcher" and seen[0]["tensor_parallel_size"] == 1
    from align.placement import resolve_device

    assert resolve_device("auto") == torch.device("cuda", 1)


def test_the_ppo_engine_options_carry_device_dtype_and_memory(pretend_cuda):
    from align.ppo import engine_options

    cfg = _ppo_cfg()
    cfg.model.dtype = "float32"
    opts = engine_options(cfg, None)
    assert (opts.device, opts.dtype, opts.memory_fraction) == ("cuda:0", "float32", 0.3)


def test_the_vllm_server_engine_and_serve_on_cuda(pretend_cuda, monkeypatch, tiny_model_path, tiny_adapter):
    from align import serve
    from align.models import load_tokenizer
    from align.rollout import vllm_server

    flags = []

    class FakeServer:
        def __init__(self, model, args, **kwargs):
            flags.append(list(args))
            raise _Captured

    monkeypatch.setattr(vllm_server, "ServerProcess", FakeServer)
    with pytest.raises(_Captured):
        vllm_server.VLLMServerEngine(tiny_model_path, load_tokenizer(tiny_model_path), dtype="float32", device="cuda")
    with pytest.raises(_Captured):
        serve.start([str(tiny_adapter)], dtype="float32", device="cuda")
    server, served = _server_flags(flags[0]), _server_flags(flags[1])
    _check(server, True, "vllm-server engine")
    _check(served, True, "align serve")
    # on a GPU the base is served as itself, not through an all-zero adapter
    assert served["served_model_name"] != serve.UNBATCHED_BASE
    assert not any("align-serve-base-" in f for f in flags[1])


def test_the_export_check_on_cuda(pretend_cuda, monkeypatch, tiny_model_path, tiny_adapter):
    import json

    from align.rollout import vllm_check

    seen = _capture_llm(monkeypatch)
    job = {"model": tiny_model_path, "lora": str(tiny_adapter), "prompt_ids": [[1, 2]], "max_tokens": 2,
           "dtype": "bfloat16", "device": "cuda:0"}
    with pytest.raises(_Captured):
        vllm_check._vllm_main(json.loads(json.dumps(job)))
    _check(seen[0], True, "export's vLLM check")


def test_engine_dtype_rule():
    from align.placement import engine_dtype

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert engine_dtype("float32", cpu, lora=True) == ("float32", None)  # vLLM's CPU LoRA takes fp32
    assert engine_dtype("float32", cuda, lora=False) == ("float32", None)
    assert engine_dtype("bfloat16", cuda, lora=True) == ("bfloat16", None)


def test_engine_dtype_on_cuda(pretend_cuda):
    from align.placement import engine_dtype

    dtype, notice = engine_dtype("float32", torch.device("cuda", 0), lora=True)
    assert dtype == "bfloat16" and "fp16/bf16" in notice


# -- one decision, in one home -------------------------------------------------------------


def test_no_literal_dtype_default_outside_placement():
    """``"float32"`` as a parameter default, and dtype tables, live in align/placement.py only."""
    problems = []
    for path in _sources():
        if path.name == "placement.py":
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in fn.args.defaults + fn.args.kw_defaults:
                    if isinstance(d, ast.Constant) and d.value in ("float32", "bfloat16", "float16"):
                        problems.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}() defaults to {d.value!r}")
        text = path.read_text()
        for needle in ('os.environ.get("LOCAL_RANK"', "_DTYPES = {"):
            if needle in text:
                problems.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not problems, "\n".join(problems)


def test_the_meter_measures_the_device_it_is_given():
    """On ``meta`` a product computes nothing, so its 'rate' is absurdly high: a probe that ignored
    its device and multiplied on the CPU (84b20d5's) would report a CPU's few hundred GFLOP/s."""
    from align.compute import matmul_peak_gflops

    assert matmul_peak_gflops(torch.float32, sizes=(4096,), seconds=0.01, device="meta") > 1e5
    assert 0 < matmul_peak_gflops(torch.float32, sizes=(256,), seconds=0.05, device="cpu") < 1e5


def test_row_seeded_sampling_on_the_cpu_is_unchanged():
    """The CPU stream of RowSeededSampler is the measured runs' (a CPU generator per row)."""
    from align.rollout.hf import RowSeededSampler

    scores = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    got = RowSeededSampler([3, 4], 1.0, 1.0)(None, scores)
    u = torch.stack([torch.rand(50, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    assert torch.equal(got, scores - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10))))


def test_a_run_records_its_device(tmp_path, tiny_model_path):
    from align.config import load_config
    from align.runs import read_manifest, start_run

    cfg = load_config("dpo", None, [f"model.name={tiny_model_path}", f"run.output_dir={tmp_path}", "run.name=r",
                                    "model.device=cpu"])
    with start_run(cfg, "dpo") as run:
        run.log({"step": 1})
    assert read_manifest(tmp_path / "r")["device"] == "cpu"


def test_gradient_checkpointing_is_an_option(tiny_model_path):
    from align.config import ModelConfig
    from align.models import load_base

    base, _ = load_base(ModelConfig(name=tiny_model_path, dtype="float32", device="cpu", gradient_checkpointing=True))
    assert base.is_gradient_checkpointing
