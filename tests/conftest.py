"""Session-wide fixtures: real assets are located once and must exist (no silent skips)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hub: everything is local or in the mirror.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align.assets import DEFAULT_MODEL_ID, resolve_model, shared_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def float32_where_the_machine_would_pick_bf16():
    """``model.dtype: auto`` resolves as on a CPU without native bf16, on every machine: the
    suite's exact equalities (packed == separate rows, two processes == one, hand computations)
    are float32's, and CI machines differ (an AVX2 EPYC picks fp32, a Xeon with AMX bf16). The
    bf16 path is tested where it is asked for by name (test_dtype.py, test_vllm.py's bf16 engine);
    a test's own monkeypatch of ``cpu_bf16_feature`` still wins. Subprocess tests pass
    ``model.dtype=float32`` themselves."""
    import align.placement

    real = align.placement.cpu_bf16_feature

    def no_native_bf16_here(cpuinfo: str = "/proc/cpuinfo"):
        return None if cpuinfo == "/proc/cpuinfo" else real(cpuinfo)  # other files read as written

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(align.placement, "cpu_bf16_feature", no_native_bf16_here)
        yield


@pytest.fixture(autouse=True)
def a_reference_store_of_its_own(tmp_path_factory, monkeypatch):
    """Each test's DPO runs (and the processes it starts) keep reference scores in a store of
    their own (``train.reference_cache: auto``): never the user's ~/.cache, and never one that an
    earlier test filled, so a test sees the store only where it asks for it."""
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path_factory.mktemp("align-cache")))


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared with the real data. Missing -> the test fails loudly (never skips)."""
    path = shared_dir()
    assert (path / "data" / "hh-rlhf").is_dir(), (
        f"real data not found at {path}; put ../shared beside the project or set ALIGN_SHARED"
    )
    return path


@pytest.fixture(scope="session")
def hh_root(shared) -> Path:
    return shared / "data" / "hh-rlhf"


@pytest.fixture(scope="session")
def real_model_path() -> str:
    path = resolve_model(DEFAULT_MODEL_ID)
    assert Path(path).is_dir(), (
        f"{DEFAULT_MODEL_ID} is not prepared (resolved to {path!r}); run scripts/setup.sh "
        "or `align prepare-assets`"
    )
    return path


@pytest.fixture(scope="session")
def real_model(real_model_path):
    """The real SmolLM2-135M-Instruct, loaded once per test session."""
    from align.config import ModelConfig
    from align.models import load_base

    return load_base(ModelConfig(name=real_model_path))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from align.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    from align.config import ModelConfig
    from align.models import load_base

    return load_base(ModelConfig(name=tiny_model_path))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory):
    """A PEFT adapter folder (r=4, untrained) on the tiny model, as any run writes it."""
    import copy

    from align.adapters import save_adapter
    from align.config import LoraConfig
    from align.models import add_policy_adapter

    base, _ = tiny_model
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(add_policy_adapter(copy.deepcopy(base), LoraConfig(r=4)), out, base.name_or_path)
    return out


@pytest.fixture(scope="session")
def real_dpo_run(real_model_path, shared, tmp_path_factory) -> Path:
    """A short real `align dpo` run (8 real HH pairs, 3 passes), shared by DPO and export tests."""
    from align.config import load_config
    from align.dpo import run_dpo

    out = tmp_path_factory.mktemp("real-runs")
    cfg = load_config("dpo", "configs/dpo_hh_rlhf.yaml", [
        "data.max_train_pairs=8", "data.max_eval_pairs=8", "train.batch_size=8", "train.epochs=3",
        "train.warmup_ratio=0", "train.max_length=128", "train.max_prompt_length=64",
        f"run.output_dir={out}", "run.name=real-dpo", "run.plot=false"])
    run_dpo(cfg)
    return out / "real-dpo"


@pytest.fixture(scope="session")
def implicit_margins_by_hand():
    """``(base_path, adapter_dir, rows, beta, max_length, max_prompt_length) -> [margin, ...]``:
    each pair's implicit-reward margin beta * ((log pi - log ref)(chosen) - (same)(rejected)),
    computed the plain way -- every answer in its own unpadded row, the reference as PEFT's
    adapter switched off, truncated as DPO truncates (the prompt's last tokens, each answer's
    first) -- to check the packed scorer's accuracies against, not against themselves."""
    import torch

    def compute(base_path, adapter_dir, rows, beta, max_length=1 << 30, max_prompt_length=1 << 30):
        from peft import PeftModel

        from align.chat import tokenize_pair
        from align.config import ModelConfig
        from align.models import load_base

        base, tok = load_base(ModelConfig(name=str(base_path), dtype="float32"))
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()

        def answer_logp(prompt, answer):
            ids = torch.tensor([prompt + answer])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            picked = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
            return float(picked[len(prompt) - 1:].sum())

        margins = []
        with torch.no_grad():
            for row in rows:
                t = tokenize_pair(tok, row)
                p = t["prompt_ids"][-max_prompt_length:]
                budget = max(1, max_length - len(p))
                r = []
                for key in ("chosen_ids", "rejected_ids"):
                    a = t[key][:budget]
                    pol = answer_logp(p, a)
                    with model.disable_adapter():
                        ref = answer_logp(p, a)
                    r.append(beta * (pol - ref))
                margins.append(r[0] - r[1])
        return margins

    return compute


def accuracy_with_ties(margins, tie: float = 1e-4):
    """Share of margins > 0, a near-zero margin (float noise between two ways of scoring) 1/2."""
    return sum(1.0 if m > tie else 0.5 if abs(m) <= tie else 0.0 for m in margins) / len(margins)


# -- tiers --------------------------------------------------------------------------------
# The fast tier (`pytest -m "not real and not vllm and not slow"`, what a developer runs before a
# commit) leaves out tests that load the real model, start vLLM, or took >= 2 s each in the
# measured full run of 84b20d5 (2-core Xeon, --durations; docs/testing.md). CI runs everything.
# A test is `real` when it uses the real model's fixtures; `slow` when it is named here.
REAL_FIXTURES = {"real_model", "real_model_path"}
SLOW = {
    "tests/test_dpo.py::test_trls_other_losses_and_a_weighted_list_train_through_the_packed_trainer",
    "tests/test_objectives.py::test_a_reference_free_run_makes_no_reference_pass",
    "tests/test_bench_preference.py::test_arms_are_recorded_reported_and_never_run_twice",
    "tests/test_reference_store.py::test_a_second_run_on_the_same_pairs_reads_its_reference_scores",
    "tests/test_objectives.py::test_a_kto_run_trains_on_both_answers_of_every_pair",
    "tests/test_multiprocess.py::test_fsdp_asked_where_the_trainer_does_not_apply_it_is_said",
    "tests/test_hardening3.py::test_a_reward_that_changes_folder_seeds_and_threads_changes_nothing_outside",
    "tests/test_hardening3.py::test_a_full_disk_while_saving_a_checkpoint_says_so_and_keeps_the_last_good_one",
    "tests/test_export.py::test_real_dpo_export_loads_in_peft_transformers_and_vllm",
    "tests/test_resume.py::test_dpo_interrupted_then_resumed_matches_uninterrupted",
    "tests/test_rm.py::test_sentiment_reward_separates_real_reviews",
    "tests/test_dpo.py::test_real_dpo_lowers_loss_and_writes_adapter",
    "tests/test_resume.py::test_rm_killed_then_resumed_matches_uninterrupted",
    "tests/test_multiprocess.py::test_dpo_two_processes_match_one",
    "tests/test_export.py::test_real_merged_bf16_export_passes_its_verification",
    "tests/test_dpo.py::test_tiny_dpo_job_end_to_end",
    "tests/test_architectures.py::test_backend_without_custom_masks_falls_back_to_rows",
    "tests/test_architectures.py::test_packed_pairs_equal_separate_rows",
    "tests/test_architectures.py::test_vllm_serves_the_policy_like_the_trainer",
    "tests/test_bad_input.py::test_bad_input_names_the_culprit",
    "tests/test_config.py::test_dry_run_checks_and_writes_nothing",
    "tests/test_eval_serve.py::test_eval_targets_side_by_side_with_a_report",
    "tests/test_eval_serve.py::test_eval_vllm_answers_equal_transformers",
    "tests/test_eval_serve.py::test_ppo_job_ends_with_the_report_when_asked",
    "tests/test_eval_serve.py::test_serve_answers_by_adapter_name_like_transformers",
    "tests/test_export.py::test_export_adapter_and_merged_reload_without_align",
    "tests/test_full_finetuning.py::test_a_full_finetuning_run_saves_and_resolves_a_model",
    "tests/test_full_finetuning.py::test_without_the_initial_evaluation",
    "tests/test_hardening.py::test_a_ppo_run_stores_the_prompts_whatever_the_reward_does",
    "tests/test_hardening.py::test_a_server_that_dies_after_start_up_points_at_a_log_that_exists",
    "tests/test_hardening.py::test_sigterm_during_the_vllm_check_publishes_nothing_and_ends_the_engine",
    "tests/test_lora_without_regret.py::test_every_arm_runs_is_reported_and_a_rerun_skips_it",
    "tests/test_models.py::test_live_copies_sees_a_base_loaded_anywhere_in_the_process",
    "tests/test_multiprocess.py::test_ppo_two_processes_match_one",
    "tests/test_ppo.py::test_ppo_shows_progress_within_an_iteration",
    "tests/test_ppo.py::test_tiny_ppo_job_end_to_end",
    "tests/test_readme.py::test_readme_command_runs",
    "tests/test_readme.py::test_readme_python_loading_snippet_runs",
    "tests/test_resume.py::test_ctrl_c_while_the_reward_function_hangs",
    "tests/test_resume.py::test_ppo_interrupted_then_resumed_matches_uninterrupted",
    "tests/test_resume.py::test_ppo_nonfinite_steps_are_skipped_then_stop_the_run",
    "tests/test_resume.py::test_resume_refuses_changed_config_and_missing_checkpoint",
    "tests/test_rewards.py::test_dpo_adapter_reward_is_its_implicit_reward",
    "tests/test_rewards.py::test_ppo_with_a_reward_of_two_terms_logs_each_term",
    "tests/test_rewards.py::test_ppo_with_reward_model_and_judge_adapters_end_to_end",
    "tests/test_rewards.py::test_reward_function_sees_the_whole_dialogue_and_plain_functions_still_work",
    "tests/test_rm.py::test_packed_reward_scores_equal_the_plain_classifier",
    "tests/test_runs.py::test_tensorboard_tracker_gets_the_ppo_metrics",
    "tests/test_server_process.py::test_port_taken_meanwhile_is_retried_and_requests_carry_the_key",
    "tests/test_verifiable.py::test_a_users_solution_dataset_runs_with_trls_accuracy_reward",
    "tests/test_verifiable.py::test_align_eval_accuracy_of_base_and_adapter",
    "tests/test_verifiable.py::test_greedy_only_evaluation",
    "tests/test_verifiable.py::test_ppo_on_the_arithmetic_task_reports_accuracy",
    "tests/test_vllm.py::test_a_bf16_engine_decodes_like_the_trainer_within_bf16_rounding",
    "tests/test_vllm.py::test_parity_across_successive_adapter_versions",
    "tests/test_vllm.py::test_server_mode_serves_adapter_on_loopback",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)
        if item.nodeid.split("[")[0] in SLOW:
            item.add_marker(pytest.mark.slow)
