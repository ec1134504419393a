"""`align eval` and `align serve` on tiny models: preference metrics of several targets in one
table, a generation comparison from one vLLM engine judged by a reward model, a report that
opens with no network and shows the answers side by side; a server that answers by adapter name
like transformers + PEFT, refuses unknown names, and stays on loopback without a key."""
from __future__ import annotations

import copy
import html.parser
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from align.config import LoraConfig, ModelConfig

PAIRS = [{"prompt": [{"role": "user", "content": f"Tell me about {w}."}],
          "chosen": [{"role": "assistant", "content": f"{w.capitalize()} is lovely and warm."}],
          "rejected": [{"role": "assistant", "content": "No."}]} for w in ("bread", "films", "Paris", "music", "rain", "tea")]


def _random_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    for n, w in model.named_parameters():
        if "lora_B" in n or ".score." in n:
            w.data.normal_(0, 0.3, generator=g)
    return model


@pytest.fixture(scope="module")
def folders(tiny_model, tiny_model_path, tmp_path_factory):
    """A DPO-like run folder, a bare policy adapter, a reward model adapter, data and prompts."""
    from align.adapters import save_adapter
    from align.models import add_policy_adapter
    from align.rm import new_reward_model

    root = tmp_path_factory.mktemp("eval")
    base, tok = tiny_model
    run = root / "runs" / "dpo-run"
    save_adapter(_random_lora(add_policy_adapter(copy.deepcopy(base), LoraConfig(r=4)), 1), run / "adapter", tiny_model_path)
    (run / "config.yaml").write_text(f"model:\n  name: {tiny_model_path}\ntrain:\n  beta: 0.2\n")
    save_adapter(_random_lora(add_policy_adapter(copy.deepcopy(base), LoraConfig(r=8)), 2), root / "other", tiny_model_path)
    rm, _ = new_reward_model(ModelConfig(name=tiny_model_path), LoraConfig(r=4))
    save_adapter(_random_lora(rm, 3), root / "rm", tiny_model_path, tokenizer=tok)
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"][0]["content"]}) + "\n" for p in PAIRS))
    return root, run


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.rows, self.external, self.images = 0, [], [], 0
        self._cells = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables += 1
        if tag == "tr":
            self._cells = []
        if tag == "img":
            self.images += 1
        for key in ("src", "href"):
            if attrs.get(key, "").startswith(("http", "//")):
                self.external.append(attrs[key])

    def handle_data(self, data):
        if self._cells is not None:
            self._cells.append(data)

    def handle_endtag(self, tag):
        if tag == "tr" and self._cells is not None:
            self.rows.append("".join(self._cells))
            self._cells = None


@pytest.mark.vllm
def test_eval_targets_side_by_side_with_a_report(folders, tmp_path, tiny_model_path, implicit_margins_by_hand):
    from conftest import accuracy_with_ties

    from align.evaluation import run_eval

    root, run = folders
    result = run_eval([str(run), str(root / "other"), str(root / "rm")], data=str(root / "pairs.jsonl"), pairs=0,
                      generate=True, prompts=str(root / "prompts.jsonl"), num_prompts=6, max_new_tokens=8,
                      judge=f"classifier:{root / 'rm'}", out=str(tmp_path / "report"))
    table = result["preferences"]["table"]
    assert set(table) == {"base", "dpo-run", "other", "rm"} and result["preferences"]["max_length"] == "untruncated"
    margins = implicit_margins_by_hand(tiny_model_path, run / "adapter", PAIRS, 0.2)
    assert table["dpo-run"]["beta"] == 0.2
    assert table["dpo-run"]["implicit_accuracy"] == pytest.approx(accuracy_with_ties(margins))
    assert "pairwise_accuracy" in table["rm"] and "reference_free_accuracy" in table["base"]
    gen = result["generation"]
    assert gen["engine"].startswith("one vLLM engine") and gen["n"] == 6
    cmp = gen["comparison"]
    samples = [json.loads(line) for line in (tmp_path / "report" / "answers.jsonl").read_text().splitlines()]
    for name in ("dpo-run", "other"):
        wins = [1.0 if s[name]["judge"] > s["base"]["judge"] else 0.5 if s[name]["judge"] == s["base"]["judge"]
                else 0.0 for s in samples]  # by hand, from the answers' stored judge scores
        assert cmp[name]["win_rate"] == pytest.approx(sum(wins) / len(wins)) and len(cmp[name]["win_rate_ci95"]) == 2
        assert cmp[name]["kl_to_base_mean"] is not None and "length_controlled_win_rate" in cmp[name]
    page = _Page()
    page.feed((tmp_path / "report" / "report.html").read_text())
    assert page.external == [] and page.images >= 1  # self-contained: nothing fetched
    answers = [r for r in page.rows if "Tell me about" in r]
    assert len(answers) == 6 and all("judge" in r for r in answers)  # prompt | base | each adapter
    saved = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert saved["generation"]["comparison"] == json.loads(json.dumps(cmp))


def test_eval_rows_keeps_only_the_half_a_run_never_saw(folders, tmp_path):
    """``--rows half-b`` scores exactly the rows :func:`row_half` puts in half-b (what a run
    trained with ``data.train_rows=half-a`` never saw), and the two halves split the file."""
    from align.data import load_preference_split, row_half
    from align.evaluation import run_eval

    root, run = folders
    data = str(root / "pairs.jsonl")
    all_rows, _ = load_preference_split(data, [], "", 0)
    halves = [row_half(r["source"]) for r in all_rows]
    assert set(halves) == {"half-a", "half-b"}, "the fixture's rows should fall in both halves"
    got = {}
    for half in ("half-a", "half-b"):
        res = run_eval([str(run)], data=data, split="", pairs=0, rows=half, out=str(tmp_path / half))
        got[half] = res["preferences"]["pairs"]
        assert res["preferences"]["rows"] == half
    assert got == {h: halves.count(h) for h in ("half-a", "half-b")}


def test_eval_vllm_answers_equal_transformers(folders, tiny_model, tiny_model_path, tmp_path):
    """The engine's greedy answers are the ones transformers gives for the base and each adapter,
    with the adapters as LoRA requests in one batch and merged into the weights one after another
    -- an adapter on fewer layers (MLP only) after ones on all of them must not keep theirs."""
    from align.adapters import save_adapter
    from align.chat import encode_prompts
    from align.evaluation import generate_answers, load_targets
    from align.models import add_policy_adapter

    root, run = folders
    mlp = tmp_path / "mlp-only"
    save_adapter(_random_lora(add_policy_adapter(copy.deepcopy(tiny_model[0]), LoraConfig(
        r=4, target_modules=["gate_proj", "up_proj", "down_proj"])), 4), mlp, tiny_model_path)
    targets, roles, tok, base = load_targets([str(run), str(root / "other"), str(mlp)], None)
    names = ["base", "dpo-run", "other", "mlp-only"]
    prompts = [{"messages": p["prompt"]} for p in PAIRS[:3]]
    encode_prompts(tok, prompts, 512)
    hf = generate_answers(targets, roles, tok, base, prompts, 8, 0.0, engine="transformers")
    assert hf["how"] == "transformers" and set(hf["answers"]) == set(names)
    assert len({str([c.token_ids for c in hf["answers"][n]]) for n in names}) == 4, "the adapters should differ"
    pytest.importorskip("vllm")
    for engine, how in (("lora", "in one batch"), ("merged", "merged into its weights")):
        vl = generate_answers(targets, roles, tok, base, prompts, 8, 0.0, engine=engine)
        assert how in vl["how"]
        for name in names:
            assert [c.token_ids for c in vl["answers"][name]] == [c.token_ids for c in hf["answers"][name]], (engine, name)


def test_serve_refuses_what_it_cannot_serve(folders, tmp_path):
    from align.serve import ServeError, plan, start

    root, run = folders
    with pytest.raises(ServeError, match="--host 0.0.0.0 exposes the server .* give --api-key"):
        start([str(run)], host="0.0.0.0")
    with pytest.raises(ServeError, match="is a reward model"):
        plan([str(root / "rm")], [], None)
    with pytest.raises(ServeError, match="adapter 'other' .* has rank 8, above --max-lora-rank 4"):
        plan([str(run), str(root / "other")], [], None, max_lora_rank=4)
    from align.tiny import make_tiny_model

    other_base = make_tiny_model(tmp_path / "b2", hidden=64, heads=1)
    (tmp_path / "foreign").mkdir()
    cfg = json.loads((root / "other" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(other_base)
    (tmp_path / "foreign" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "foreign" / "adapter_model.safetensors").write_bytes((root / "other" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ServeError, match="different bases"):
        plan([str(run), str(tmp_path / "foreign")], [], None)
    base, served, slot = plan([str(run)], [f"mine={root / 'other'}"], None)
    assert [s.name for s in served] == ["dpo-run", "mine"] and slot == 8


@pytest.mark.vllm
def test_serve_answers_by_adapter_name_like_transformers(folders, tiny_model_path):
    import openai
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.chat import greedy_generate
    from align.models import load_tokenizer
    from align.serve import start

    root, run = folders
    server, base, served = start([str(run)], [f"other={root / 'other'}"], port=0)
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.api_key is None  # loopback, no key
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        tok = load_tokenizer(tiny_model_path)
        messages = [{"role": "user", "content": "Tell me about bread."}]
        names = ("dpo-run", "other", base)
        with ThreadPoolExecutor(len(names)) as pool:  # at once: one batch mixing the base and adapters
            got = dict(zip(names, pool.map(lambda n: client.chat.completions.create(
                model=n, messages=messages, temperature=0, max_tokens=12).choices[0].message.content, names)))
        for name, path in (("dpo-run", run / "adapter"), ("other", root / "other"), (base, None)):
            ref = AutoModelForCausalLM.from_pretrained(tiny_model_path)
            ref = PeftModel.from_pretrained(ref, str(path)) if path else ref
            # a random model's bytes: vLLM's streaming detokenizer holds back an unfinished UTF-8
            # character at the very end, where a one-shot decode writes U+FFFD
            assert got[name].rstrip("\ufffd") == greedy_generate(ref, tok, messages, max_new_tokens=12).rstrip("\ufffd"), name
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-adapter", messages=messages, max_tokens=4)
        listed = {m.id for m in client.models.list().data}
        assert {"dpo-run", "other", base} <= listed
    finally:
        server.close()
    assert server.proc.poll() is not None


@pytest.mark.vllm
def test_ppo_job_ends_with_the_report_when_asked(tmp_path, tiny_model_path):
    """eval.generate: the trained policy against its base on the job's held-out prompts."""
    from align.config import load_config
    from align.ppo import run_ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in "abcdefgh"))
    summary = run_ppo(load_config("ppo", None, [
        f"model.name={tiny_model_path}", f"data.dataset={prompts}", "data.eval_prompts=3", "rollout.max_new_tokens=4",
        "reward.function=reward.examples:length_target", "ppo.iterations=1", "ppo.prompts_per_iteration=2",
        "ppo.minibatch_size=4", "eval.generate=true", "eval.max_new_tokens=6",
        "eval.judge=function:reward.examples:ends_with_period", f"run.output_dir={tmp_path}", "run.name=r", "run.plot=false"]))
    report = tmp_path / "r" / "eval-report" / "report.html"
    assert summary["eval_report"] == str(report) and report.is_file()
    assert json.loads((tmp_path / "r" / "eval-report" / "eval.json").read_text())["generation"]["n"] == 3


def test_a_checkpoint_of_a_run_is_a_target_named_after_its_run(folders):
    """`align eval RUN/checkpoints/step-N`: the checkpoint's adapter, the run's config, a name
    that says which run and step it is."""
    import shutil

    from align.artifacts import resolve

    root, run = folders
    ckpt = run / "checkpoints" / "step-10"
    shutil.copytree(run / "adapter", ckpt / "adapter")
    t = resolve(str(ckpt))
    assert (t.name, t.path, t.kind, t.job, t.beta) == ("dpo-run@step-10", ckpt / "adapter", "adapter", "dpo", 0.2)
    assert resolve(str(run)).name == "dpo-run"
