"""Nothing a user owns is touched, and nothing a user asks for is silently dropped (issue 27).

The bad-input catalogue (tests/test_bad_input.py) holds the inputs that must fail cleanly; this
file holds the behaviours that must *work* safely: a sibling folder that survives a replace, a
secret that reaches no file or argv, an export stopped by a signal, rewards that cannot reach
what the run stores, plausible ranges on every numeric key, a divergence that is stopped, the
options table, file modes, and the schedule's warm-up."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.config import JOBS, ConfigError, LoraConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def adapter(tiny_adapter):
    return tiny_adapter


# -- 1: temporary and backup names never collide with a user's folder --------------------------


def test_replacing_an_output_keeps_a_users_sibling_named_like_a_backup(adapter, tmp_path):
    from align.atomic import atomic_dir
    from align.export import export

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.txt").write_text("replaced with --force")
    for sibling in ("model.old", ".old-model", ".model.tmp-x"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "KEEP").write_text("the user's")
    export(adapter, tmp_path / "model", force=True, vllm_check=False)
    with atomic_dir(tmp_path / "evout") as tmp:  # align eval's writer, onto an existing folder
        (tmp / "eval.json").write_text("{}")
    (tmp_path / "evout.old").mkdir()
    (tmp_path / "evout.old" / "KEEP").write_text("the user's")
    with atomic_dir(tmp_path / "evout") as tmp:
        (tmp / "eval.json").write_text("{}")
    for sibling in ("model.old", ".old-model", ".model.tmp-x", "evout.old"):
        assert (tmp_path / sibling / "KEEP").read_text() == "the user's", sibling
    assert (tmp_path / "model" / "adapter_config.json").is_file() and not (tmp_path / "model" / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-x", ".old-model", "evout", "evout.old",
                                                          "model", "model.old"]  # no leftovers of ours


# -- 2: what a run of align is, decided in one place --------------------------------------------


def test_prepare_assets_relinks_a_dangling_data_link_and_leaves_what_a_user_put_in_the_mirror(tmp_path):
    """A mirror link left dangling by a moved data folder is pointed at the data again; a user's
    own file, folder or working link at a mirror path stays as it was."""
    from align.assets import _link

    data, other = tmp_path / "shared" / "hh", tmp_path / "mine"
    data.mkdir(parents=True)
    other.mkdir()
    mirror = tmp_path / "mirror"
    (mirror / "a").mkdir(parents=True)
    (mirror / "a" / "dangling").symlink_to(tmp_path / "moved-away", target_is_directory=True)
    (mirror / "a" / "users-link").symlink_to(other, target_is_directory=True)
    (mirror / "a" / "users-file").write_text("keep")
    (mirror / "a" / "users-folder").mkdir()
    said = []
    for name in ("dangling", "users-link", "users-file", "users-folder", "new"):
        _link(data, mirror / "a" / name, said.append)
    assert (mirror / "a" / "dangling").resolve() == data.resolve() == (mirror / "a" / "new").resolve()
    assert (mirror / "a" / "users-link").resolve() == other.resolve()
    assert (mirror / "a" / "users-file").read_text() == "keep" and (mirror / "a" / "users-folder").is_dir()
    assert len(said) == 3 and all("left as it is" in s for s in said)


def test_run_job_tells_align_runs_from_other_folders(tmp_path):
    from align.runs import check_run_folder, run_job

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "run.json").write_text('{"job": "ppo"}')
    old = tmp_path / "old"  # a run made before run.json: its config.yaml tells
    old.mkdir()
    (old / "config.yaml").write_text("model:\n  name: m\nrun:\n  seed: 0\ntrain:\n  beta: 0.1\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own file\n")
    assert (run_job(tmp_path / "new"), run_job(old), run_job(mine), run_job(tmp_path / "absent")) == \
        ("ppo", "dpo", None, None)
    check_run_folder(tmp_path / "absent", "dpo")  # a new folder is fine
    check_run_folder(old, "dpo")
    with pytest.raises(ValueError, match="not a run of align"):
        check_run_folder(mine, "dpo")
    with pytest.raises(ValueError, match="is an `align ppo` run"):
        check_run_folder(tmp_path / "new", "dpo")


def test_a_run_writes_its_manifest_and_a_folder_made_before_it_still_resumes(tmp_path, tiny_model_path):
    from align.runs import start_run

    cfg = load_config("dpo", None, [f"model.name={tiny_model_path}", f"run.output_dir={tmp_path}", "run.name=r"])
    with start_run(cfg, "dpo") as run:
        run.log({"step": 1})
    from align.placement import resolve_dtype

    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert (manifest["job"], manifest["dtype"], manifest["base"]["id"]) == ("dpo", resolve_dtype("auto"), tiny_model_path)
    (tmp_path / "r" / "run.json").unlink()  # as today's older runs are: config.yaml only
    (tmp_path / "r" / "checkpoints" / "step-1").mkdir(parents=True)
    cfg = load_config("dpo", None, [f"model.name={tiny_model_path}", f"run.output_dir={tmp_path}", "run.name=r",
                                    "run.resume=must"])
    with start_run(cfg, "dpo") as run:
        assert run.resume_from == tmp_path / "r" / "checkpoints" / "step-1"


# -- 3: secrets reach no file, no printed config, no argv ---------------------------------------


def test_a_secret_in_the_config_is_written_nowhere(tmp_path, tiny_model_path):
    from align.config import dump_yaml, to_dict
    from align.runs import start_run

    cfg = load_config("ppo", None, [f"model.name={tiny_model_path}", "rollout.server_api_key=hunter2-secret",
                                    f"run.output_dir={tmp_path}", "run.name=r", "data.dataset=x.jsonl"])
    assert cfg.rollout.server_api_key == "hunter2-secret"  # the code still has it
    assert "hunter2-secret" not in dump_yaml(cfg) and "hunter2-secret" not in json.dumps(to_dict(cfg))
    with start_run(cfg, "ppo") as run:
        run.log({"step": 1})
        run.write_json("summary.json", {"ok": 1})
    for f in (tmp_path / "r").rglob("*"):
        if f.is_file():
            assert b"hunter2-secret" not in f.read_bytes(), f
    out = subprocess.run([sys.executable, "-m", "align.cli", "config", "ppo", "rollout.server_api_key=hunter2-secret"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "hunter2-secret" not in out.stdout and "<redacted>" in out.stdout


def test_serve_reads_its_key_from_a_private_file_or_the_environment(tmp_path):
    from align.serve import ServeError, read_api_key

    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o600)
    assert read_api_key(str(key), None, env={}) == "s3cret"
    assert read_api_key(None, None, env={"VLLM_API_KEY": "from-env"}) == "from-env"
    assert read_api_key(None, None, env={}) is None
    key.chmod(0o640)
    with pytest.raises(ServeError, match="can be read by other users"):
        read_api_key(str(key), None, env={})
    help_text = subprocess.run([sys.executable, "-m", "align.cli", "serve", "--help"], capture_output=True,
                               text=True).stdout
    assert "visible to every user" in " ".join(help_text.split())


# -- 4: a signal during export's vLLM check: nothing published, no orphan -----------------------


def _vllm_check_processes(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "align.rollout.vllm_check" in cmd and marker in cmd:
            found.append(int(pid))
    return found


@pytest.mark.vllm
def test_sigterm_during_the_vllm_check_publishes_nothing_and_ends_the_engine(adapter, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "exported"
    out.mkdir()
    (out / "PREVIOUS").write_text("the export that was there before")
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "export", str(adapter), "--out", str(out), "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if "checking the export in vLLM" in line:
                break
        deadline = time.time() + 60
        while not _vllm_check_processes(str(tmp_path)) and time.time() < deadline:
            time.sleep(0.2)
        assert _vllm_check_processes(str(tmp_path)), "the vLLM check never started"
        time.sleep(2)  # well inside the engine's start-up
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "nothing was published" in err
    assert sorted(p.name for p in out.iterdir()) == ["PREVIOUS"]  # the previous content, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temp folder left
    deadline = time.time() + 30
    while _vllm_check_processes(str(tmp_path)) and time.time() < deadline:
        time.sleep(0.5)
    assert _vllm_check_processes(str(tmp_path)) == []  # the check and its engine are gone


# -- 5, 6: the reward function gets copies, and its exits are its errors -------------------------


def test_a_reward_that_edits_its_arguments_changes_nothing_outside():
    from reward.api import call_reward

    messages = [[{"role": "user", "content": "original"}]]
    prompts, completions = ["original"], ["an answer"]

    def vandal(prompts, completions, messages, completion_ids):
        messages[0][0]["content"] = "rewritten"
        prompts[0], completions[0] = "rewritten", "rewritten"
        completion_ids[0].append(99)
        return [1.0]

    ids = [[1, 2]]
    assert call_reward(vandal, prompts, completions, messages=messages, completion_ids=ids) == [1.0]
    assert messages == [[{"role": "user", "content": "original"}]] and prompts == ["original"]
    assert completions == ["an answer"] and ids == [[1, 2]]


def test_a_ppo_run_stores_the_prompts_whatever_the_reward_does(tmp_path, tiny_model_path):
    from align.ppo import run_ppo

    (tmp_path / "vandal.py").write_text(
        "def reward(prompts, completions, messages, **k):\n"
        "    for m in messages:\n        m[0]['content'] = 'REWRITTEN'\n"
        "    return [float(len(c)) for c in completions]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in "abcdef"))
    run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.eval_prompts=2", "rollout.max_new_tokens=4",
        f"reward.function={tmp_path / 'vandal.py'}:reward", "ppo.iterations=1", "ppo.prompts_per_iteration=2",
        "ppo.minibatch_size=4", "ppo.eval_every=1", f"run.output_dir={tmp_path}", "run.name=r", "run.plot=false"]))
    stored = [f.read_text() for f in (tmp_path / "r").glob("*.jsonl")]
    assert any("Tell me about" in s for s in stored) and not any("REWRITTEN" in s for s in stored)


# -- 8: plausible ranges on every numeric key; a diverging run is stopped -----------------------


def _numeric_keys(cls, prefix=""):
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield f"{prefix}{f.name}", f


def _cfg_node(cfg, dotted):
    for part in filter(None, dotted.split(".")):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("job", list(JOBS))
def test_every_numeric_key_has_a_plausible_range_that_is_enforced(job):
    from align.config import check_declared

    keys = list(_numeric_keys(JOBS[job]))
    assert len(keys) >= 20
    for key, f in keys:
        lo, hi, lo_open, hi_open = f.metadata["range"]
        assert lo is not None and hi is not None, f"{job}: {key} has no upper or lower bound"
        for bad in (hi * 10 + 1, lo - 1):
            with pytest.raises(ConfigError, match=rf"key '{key}' must be .*, got {bad}"):
                load_config(job, None, [f"{key}={bad}"])
        for good in (lo if not lo_open else None, hi if not hi_open else None):
            if good is not None:  # the bounds themselves pass the range check (other checks aside)
                cfg = JOBS[job]()
                section, _, name = key.rpartition(".")
                setattr(_cfg_node(cfg, section), name, f.type in ("int", int) and int(good) or good)
                assert [k for k, _ in check_declared(cfg)] == [], key


def test_update_ratio_matches_a_hand_computation(tiny_model):
    from align.guards import lora_update_ratio
    from align.models import add_policy_adapter

    base, _ = tiny_model
    model = add_policy_adapter(copy.deepcopy(base), LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    for n, w in model.named_parameters():
        if "lora_B" in n:
            w.data.normal_(0, 0.05, generator=g)
    want, where = 0.0, ""
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
                delta = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
                r = float(delta.norm() / m.base_layer.weight.norm())
                if r > want:
                    want, where = r, name
    got, got_where = lora_update_ratio(model)
    assert got == pytest.approx(want, rel=1e-4) and got_where.startswith(where)


def test_a_run_that_diverges_at_an_in_range_learning_rate_is_stopped_unsaved(tmp_path, tiny_model_path):
    import contextlib
    import io

    from align.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"Good answer {i}.", "rejected": "No."}) + "\n"
                             for i in range(16)))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["dpo", f"model.name={tiny_model_path}", f"data.dataset={pairs}", "data.train_subsets=[]",
                   "data.eval_subsets=[]", "train.learning_rate=0.5", "train.batch_size=4", "train.epochs=2",
                   "run.save_every=1", f"run.output_dir={tmp_path}", "run.name=r", "run.plot=false"])
    assert rc == 1 and "training diverged at step" in err.getvalue(), err.getvalue()[-2000:]
    diverged = int(err.getvalue().split("training diverged at step ")[1].split(":")[0])
    run = tmp_path / "r"
    assert not (run / "adapter").exists() and not (run / "summary.json").exists() and not (run / "eval.json").exists()
    saved = [int(d.name.split("-")[1]) for d in (run / "checkpoints").glob("step-*")]
    assert all(s < diverged for s in saved), (saved, diverged)  # nothing saved from the diverged step on


# -- 9, 10: data rows ---------------------------------------------------------------------------


def test_identical_answers_are_skipped_in_every_format_and_a_bom_is_not_a_bad_row(tmp_path):
    from align.data import load_preference_split

    rows = [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
            {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "X"}],
             "rejected": [{"role": "assistant", "content": "X"}]},
            {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Y"}],
             "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Y"}]},
            {"chosen": "\n\nHuman: Hi?\n\nAssistant: Z", "rejected": "\n\nHuman: Hi?\n\nAssistant: Z"}]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    kept, report = load_preference_split(str(path), [], "")
    assert [k["source"] for k in kept] == [f"{path}:1"]
    assert report.skipped == {"identical answers": 4} and report.kept == 1


# -- 11: options that have no effect are said, for every row of the table -----------------------


def _row_id(row):
    return f"{row.where}:{row.key}"


def _notices_for(row, extra):
    from align.cli import _parse, build_parser
    from align.notices import JOBS as NOTICE_JOBS, notices

    if row.where in NOTICE_JOBS:
        value = [f"{row.key}={row.value}"]
        return notices(row.where, load_config(row.where, None, [*extra, *value]))
    flag = [row.key] + ([row.value] if row.value else [])
    positional = {"eval": ["runs/x"], "export": ["runs/x", "--out", "o"], "serve": []}[row.where]
    parser = build_parser()
    return notices(row.where, _parse([row.where, *positional, *extra, *flag], parser), parser.align_commands[row.where])


def test_the_table_covers_real_keys_and_flags():
    from align.cli import build_parser
    from align.config import JOBS as CONFIGS
    from align.notices import TABLE

    commands = build_parser().align_commands
    for row in TABLE:
        if row.where in CONFIGS:
            node = CONFIGS[row.where]()
            for part in row.key.split("."):
                node = getattr(node, part)  # AttributeError: the table names a key that is gone
        else:
            assert any(row.key in a.option_strings for a in commands[row.where]._actions), _row_id(row)
    assert len(TABLE) >= 40


@pytest.mark.parametrize("row", __import__("align.notices").notices.TABLE, ids=_row_id)
def test_an_option_without_effect_is_said(row):
    said = _notices_for(row, list(row.inert_with))
    assert any(row.key in m and "has no effect" in m for m in said), said
    if row.effective_with is not None:
        said = _notices_for(row, list(row.effective_with))
        assert not any(f"{row.key} has" in m for m in said), said


def test_the_docs_table_is_generated_from_the_code():
    from align.notices import markdown

    assert (ROOT / "docs" / "options-without-effect.md").read_text() == markdown()


def test_cli_prints_the_notice(tmp_path):
    out = subprocess.run([sys.executable, "-m", "align.cli", "ppo", "--config", "configs/ppo_imdb_sentiment.yaml",
                          "reward.kind=dpo", "reward.adapter=runs/x", "reward.function=mine.py:f", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT)
    assert "note: reward.function has no effect when reward.kind is not function" in out.stderr


# -- 13: align serve on a port in use; a server that dies keeps its log ------------------------


def test_a_server_that_dies_after_start_up_points_at_a_log_that_exists(tmp_path, tiny_model_path, monkeypatch):
    from align.rollout.vllm_server import ServerProcess
    from align.serve import serve

    fake = tmp_path / "dies.py"
    fake.write_text(
        "import sys, threading, time\nfrom http.server import BaseHTTPRequestHandler, HTTPServer\n"
        "a = sys.argv; port = int(a[a.index('--port') + 1])\n"
        "class H(BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *x): pass\n"
        "s = HTTPServer(('127.0.0.1', port), H)\nthreading.Thread(target=s.serve_forever, daemon=True).start()\n"
        "print('engine core failed: out of memory', flush=True)\ntime.sleep(2)\nsys.exit(1)\n")
    monkeypatch.setattr(ServerProcess, "LAUNCHER", (sys.executable, str(fake)))
    said = []
    assert serve([], base=tiny_model_path, port=0, log=said.append) == 1
    import re

    log = re.search(r"log (\S+) \(kept\)", said[-1]).group(1)
    assert "out of memory" in Path(log).read_text()


# -- 14: files follow the user's umask ---------------------------------------------------------


def test_files_a_run_and_an_export_write_follow_the_umask(tmp_path, tiny_model_path):
    from align.cli import main
    from align.export import export

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": "No."}) + "\n"
                             for i in range(8)))
    old = os.umask(0o027)
    try:
        assert main(["dpo", f"model.name={tiny_model_path}", f"data.dataset={pairs}", "data.train_subsets=[]",
                     "data.eval_subsets=[]", "train.batch_size=4", "run.save_every=1", f"run.output_dir={tmp_path}",
                     "run.name=r"]) == 0
        export(tmp_path / "r", tmp_path / "exp", vllm_check=False)
    finally:
        os.umask(old)
    wrong = [(str(p), oct(p.stat().st_mode & 0o777)) for root in (tmp_path / "r", tmp_path / "exp")
             for p in [root, *root.rglob("*")]
             if p.stat().st_mode & 0o777 != (0o750 if p.is_dir() else 0o640)]
    assert wrong == []


# -- 20: warm-up means the ratio of steps the key says -----------------------------------------


@pytest.mark.parametrize("ratio, total, steps", [(0.0, 40, 0), (0.05, 40, 2), (0.5, 40, 20), (1.0, 40, 40),
                                                 (1.0, 7, 7)])
def test_warmup_ratio_is_a_ratio_for_every_allowed_value(ratio, total, steps):
    from align.dpo.trainer import dpo_args
    from align.rm import rm_args

    for job, make in (("dpo", dpo_args), ("rm", rm_args)):
        args = make(load_config(job, None, [f"train.warmup_ratio={ratio}"]), "/tmp/unused")
        assert args.get_warmup_steps(total) == steps, job


# -- 12: YAML as users type it -------------------------------------------------------------------


def test_yaml_words_are_text_where_text_is_wanted_and_booleans_where_booleans_are(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("run:\n  resume: off\n  plot: off\nevaluate: no\n")
    cfg = load_config("dpo", path)
    assert (cfg.run.resume, cfg.run.plot, cfg.evaluate) == ("off", False, False)
    cfg = load_config("dpo", None, ["run.resume=off", "run.plot=true"])
    assert (cfg.run.resume, cfg.run.plot) == ("off", True)
