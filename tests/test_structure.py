"""The seams the code is organised around, checked so that a change that crosses them fails
here rather than in a review: import direction, no import cycles, short functions, and
registries whose entries really exist."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("align", "reward"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every module this one imports, at the top or inside a function (absolute names)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = {f"{target}.{a.name}" for a in node.names}
            out.update(subs)
            out.add(target)
    return out


MODULES = _modules()
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _importers(prefix: str, of: str) -> list[str]:
    return sorted(m for m, deps in IMPORTS.items() if m.startswith(prefix)
                  and any(d == of or d.startswith(of + ".") for d in deps))


def test_import_direction():
    assert _importers("align.rollout", "align.dpo") == []
    assert _importers("align.ppo", "align.dpo") == []
    assert _importers("reward", "align.rm") == []
    for job in ("align.dpo", "align.ppo", "align.rm"):  # reward/ knows no trainer
        assert _importers("reward", job) == [], job
    vllm_users = sorted(m for m, deps in IMPORTS.items() if any(d.split(".")[0] == "vllm" for d in deps))
    assert vllm_users and all(m.startswith("align.rollout.") for m in vllm_users), vllm_users
    jobs = ("align.dpo", "align.ppo", "align.rm", "align.export", "align.runs")
    assert not [d for d in IMPORTS["align.config"] if d.startswith(jobs)]  # config imports no job


def test_no_import_cycles():
    """Between modules (a package importing its own sub-modules lazily is not a cycle)."""
    graph = {m: {d for d in deps if d in MODULES and d != m and not m.startswith(d + ".")}
             for m, deps in IMPORTS.items()}
    seen, cycles = {}, []

    def visit(m, stack):
        seen[m] = "open"
        for d in graph[m]:
            if seen.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in seen:
                visit(d, stack + [d])
        seen[m] = "done"

    for m in graph:
        if m not in seen:
            visit(m, [m])
    assert cycles == []


def _function_lengths(pkg: str) -> dict[str, int]:
    out = {}
    for path in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_functions_are_short():
    lengths = _function_lengths("align")
    assert {k: n for k, n in lengths.items() if n > 70} == {}
    (train_ppo,) = [n for k, n in lengths.items() if k.endswith(" train_ppo")]
    assert train_ppo <= 40


def _defines(module: str, cls: str) -> bool:
    path = MODULES[module]
    return any(isinstance(n, ast.ClassDef) and n.name == cls for n in ast.walk(ast.parse(path.read_text())))


def test_registries_point_at_real_code():
    from align.ppo.advantages import ESTIMATORS
    from align.rollout import ENGINES

    for name, target in ENGINES.items():
        module, cls = target.split(":")
        assert _defines(module, cls), name
    from align.rollout import engine_class
    from align.rollout.base import RolloutEngine

    assert issubclass(engine_class("hf"), RolloutEngine)
    assert ESTIMATORS["gae"].needs_critic and not ESTIMATORS["rloo"].needs_critic
    assert all(e.name == k for k, e in ESTIMATORS.items())
