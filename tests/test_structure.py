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


JOBS = ("align.dpo", "align.ppo", "align.rm")
# What reward/ (user-facing reward code, documented as knowing no trainer) may import from align:
# public helpers that load models/adapters, assets and chat text -- none imports a job.
REWARD_MAY_IMPORT = ("align.adapters", "align.artifacts", "align.assets", "align.chat", "align.data.rows",
                     "align.placement")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_import_direction():
    assert _importers("align.rollout", "align.dpo") == []
    for job in JOBS:  # jobs never import each other, nor evaluation's job code
        for other in JOBS + ("align.evaluation", "align.cli"):
            if other != job:
                assert _importers(job, other) == [], (job, other)
    reaches = {d for m, deps in IMPORTS.items() if m.startswith("reward") for d in deps if d.startswith("align")}
    assert reaches and all(any(_within(d, ok) for ok in REWARD_MAY_IMPORT) for d in reaches), sorted(reaches)
    for helper in REWARD_MAY_IMPORT:  # ...and those helpers know no trainer either
        assert not [d for d in _closure(helper) if any(_within(d, j) for j in JOBS)], helper
    vllm_users = sorted(m for m, deps in IMPORTS.items() if any(d.split(".")[0] == "vllm" for d in deps))
    assert vllm_users and all(m.startswith("align.rollout.") for m in vllm_users), vllm_users
    assert not [d for d in IMPORTS["align.config"] if d.startswith("align.") or d.startswith(".")]  # config: the bottom


def _closure(module: str) -> set[str]:
    """Every align/reward module ``module`` reaches through imports."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        for d in IMPORTS.get(m, ()):
            if d in MODULES and d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def _unit(module: str) -> str:
    """The package-level unit a module belongs to: ``align.dpo.trainer`` -> ``align.dpo``,
    ``align.config`` -> itself, anything in reward/ -> ``reward``."""
    parts = module.split(".")
    return "reward" if parts[0] == "reward" else ".".join(parts[:2])


def package_cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between package-level units (strongly connected components of more than one):
    ``dpo -> evaluation -> dpo`` is one even when no single module imports its own importer."""
    graph: dict[str, set[str]] = {}
    for m, deps in imports.items():
        graph.setdefault(_unit(m), set()).update(_unit(d) for d in deps if d in MODULES and _unit(d) != _unit(m))
    index, low, stack, out = {}, {}, [], []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while comp[-1:] != [v]:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


# The layers, bottom up: a unit imports only from its own layer or below (docs/layout.md).
LAYERS = [
    ("align.config", "align.atomic", "align.distributed", "align.placement"),
    ("align.assets", "align.deps", "align.guards", "align.memory", "align.compute", "align.tiny"),
    ("align.checkpoints", "align.scoring", "align.models", "align.chat", "align.data"),
    ("align.adapters", "align.runs"),
    ("align.artifacts", "align.roles", "align.rollout"),
    ("reward", "align.verifiable", "align.scorers"),
    ("align.dpo", "align.ppo", "align.rm"),                     # the jobs
    ("align.evaluation", "align.report", "align.export", "align.serve", "align.notices"),
    ("align.cli",),
]


def test_imports_point_down_the_layers():
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    units = {_unit(m) for m in MODULES} - {"align"}
    assert units == set(rank), units ^ set(rank)  # every package/module has its layer
    upward = sorted({(_unit(m), _unit(d)) for m, deps in IMPORTS.items() for d in deps
                     if d in MODULES and _unit(d) in rank and _unit(m) in rank and rank[_unit(d)] > rank[_unit(m)]})
    assert upward == []


def test_no_package_cycles():
    assert package_cycles(IMPORTS) == []


def test_the_package_cycle_check_finds_a_planted_cycle():
    """The check above fails on what it exists to catch: a job calling back into the code that
    calls it (here the CLI, which imports every job) -- a cycle between packages even though no
    module imports its own importer."""
    planted = {m: set(deps) for m, deps in IMPORTS.items()}
    planted["align.dpo.trainer"].add("align.cli")
    assert any({"align.dpo", "align.cli"} <= set(c) for c in package_cycles(planted))
    assert any(_within(d, "align.dpo") for d in IMPORTS["align.cli"])  # the other half is real


def test_vocabulary_log_probs_live_in_the_scoring_layer():
    """log_softmax / gather over vocabulary logits: only align/scoring/ (and the pure-tensor
    losses) compute them, so there is one definition of a token's log-prob."""
    allowed = {ROOT / "align" / "ppo" / "losses.py"}
    found = []
    for path in (ROOT / "align").rglob("*.py"):
        if path.parent.name == "scoring" or path in allowed:
            continue
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {w}" for w in ("log_softmax", ".gather(-1", "logsumexp") if w in text]
    assert found == []


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
    from align.config import RolloutConfig
    import dataclasses

    (engine,) = [f for f in dataclasses.fields(RolloutConfig) if f.name == "engine"]
    assert set(engine.metadata["choices"]) == set(ENGINES)  # config declares the names it accepts
    from align.runs import AFTER_JOB

    for key, (switch, target) in AFTER_JOB.items():
        module, fn = target.split(":")
        assert module in MODULES and fn in {n.name for n in ast.walk(ast.parse(MODULES[module].read_text()))
                                            if isinstance(n, ast.FunctionDef)}, key
    assert ESTIMATORS["gae"].needs_critic and not ESTIMATORS["rloo"].needs_critic
    assert all(e.name == k for k, e in ESTIMATORS.items())
