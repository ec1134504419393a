"""results/TABLE.md is what scripts/results_table.py makes of the JSON files in results/."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_table_is_generated_from_the_files():
    table = _script()
    assert (ROOT / "results" / "TABLE.md").read_text() == table.render()
    assert table.main(["--check"]) == 0


def test_a_number_in_the_table_comes_from_its_file(tmp_path, monkeypatch):
    import json
    import shutil

    table = _script()
    for name in ("dpo_hh_rlhf_summary.json",):
        shutil.copy2(ROOT / "results" / name, tmp_path / name)
    data = json.loads((tmp_path / "dpo_hh_rlhf_summary.json").read_text())
    data["eval"]["implicit_accuracy"] = 0.777
    (tmp_path / "dpo_hh_rlhf_summary.json").write_text(json.dumps(data))
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    monkeypatch.setattr(table, "TABLE", tmp_path / "TABLE.md")
    assert "| 0.777 |" in table.render() and table.main(["--check"]) == 1
