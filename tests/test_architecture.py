"""The shape of the package: no import cycle, runtime modules that a rewritten model needs at run time,
one pass list per front door, no routing in the front door."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import networkx as nx
import pytest
import torch
from torch import nn

import fxwormhole as fw
from fxwormhole import zoo
from fxwormhole.passes import _common
from helpers import TinyLSTM, TinyMLP

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = Path(fw.__file__).parent
#: modules kept only so that old imports (and models pickled before a move) keep working
ALIASES = {"fxwormhole.demo", "fxwormhole.runtime.activations"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """fxwormhole modules ``path`` imports: at module level AND inside functions (a lazy import is still
    a dependency), except in a module-level ``__getattr__``, which only re-exports names that moved."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__" for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import zoo` imports a module
    return {m for m in found if m in known and m != name}


def _import_graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        g.add_edges_from((name, dep) for dep in _imports(name, path, set(modules)))
    return g


def test_no_import_cycle_inside_the_package():
    g = _import_graph()
    g.remove_nodes_from([n for n in list(g) if n == "fxwormhole"])  # the package's lazy front door re-exports all
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert cycles == [], f"import cycles: {cycles}"
    # the circle the sensitivity front door had: instrument -> passes -> runtime.sensitivity -> instrument
    assert not nx.has_path(g, "fxwormhole.runtime.sensitivity", "fxwormhole.instrument")


def test_the_runtime_does_not_import_the_front_doors_or_the_rewriting_passes():
    g = _import_graph()
    runtime = [n for n in g if n.startswith("fxwormhole.runtime.") and n not in ALIASES]
    transform_time = {"fxwormhole.api", "fxwormhole.capture", "fxwormhole.instrument", "fxwormhole.analysis",
                      "fxwormhole.passes.pipeline", "fxwormhole.passes.plan_wormholes", "fxwormhole.passes.insert_wormholes",
                      "fxwormhole.passes.wrap_fixed_points", "fxwormhole.passes.normalise_export",
                      "fxwormhole.passes.temporal_wormhole", "fxwormhole.passes.verify"}
    for module in runtime:
        reached = nx.descendants(g, module) & transform_time
        assert not reached, f"{module} needs transform-time modules {sorted(reached)}"


def _runtime_closure(models: list[nn.Module]) -> set[str]:
    """Modules reachable from the classes a rewritten model is made of (what runs or unpickles)."""
    g = _import_graph()
    seeds = set()
    for model in models:
        for m in model.modules():
            seeds.add(type(m).__module__)
            for value in vars(m).values():  # solver configs, grad strategies, inits, temporal holders
                seeds.add(type(value).__module__)
    seeds &= set(g)
    return seeds | {d for s in seeds for d in nx.descendants(g, s)}


def test_no_runtime_module_is_needed_only_at_transform_time():
    """Every module in runtime/ is reachable from what a rewritten model holds: feed-forward fixed
    points (Anderson, spectral guard), temporal wormholes, sensitivity probes, fused cell loops."""
    x = torch.randn(4, 5)
    models = [
        fw.transform(TinyMLP(), (x,), fw.WormholeConfig(wormholes=[("fc3", "fc1")], spectral_norm=True),
                     sal=fw.SALConfig()),
        fw.transform(TinyLSTM(), (torch.randn(2, 4, 3),), sal=fw.SALConfig()),
        fw.transform(zoo.GRUCellLoop(), zoo.GRUCellLoop().example_inputs()),  # a user's cell loop, fused
        # dropout and BatchNorm inside a cycle, training penalties (cycle_layers, cycle_penalties)
        fw.transform(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.1), nn.Linear(6, 6)), (x,),
                     fw.WormholeConfig(wormholes=[("3", "0")], contraction=1.0)),
    ]
    needed = _runtime_closure(models)
    runtime = {n for n in _modules() if n.startswith("fxwormhole.runtime.")} - ALIASES
    assert runtime - needed == set(), f"runtime modules no rewritten model needs: {sorted(runtime - needed)}"


def test_transform_and_instrument_run_one_pass_list(monkeypatch):
    calls = []
    real = _common.PassManager.__call__

    def counting(self, module):
        calls.append([type(p).__name__ for p in self.passes])
        return real(self, module)

    monkeypatch.setattr(_common.PassManager, "__call__", counting)
    fw.transform(TinyLSTM(), (torch.randn(2, 4, 3),), sal=fw.SALConfig())
    assert calls == [["DecomposeRecurrent", "TemporalWormholes", "PlanWormholes", "InsertWormholes", "WrapFixedPoints",
                      "RefuseDeadCycles", "SeparateAliasedInputs", "SolveDropoutMasks", "CycleLayers", "CyclePenalties", "SensitivityAnnotate", "SensitivityInsert"]]
    calls.clear()
    fw.transform(TinyMLP(), (torch.randn(4, 5),), front_end="export")
    assert len(calls) == 1 and calls[0][0] == "NormaliseExport"
    calls.clear()
    fw.instrument(TinyMLP(), (torch.randn(4, 5),))
    assert calls == [["SensitivityAnnotate", "SensitivityInsert"]]


def test_the_front_door_holds_no_routing():
    from fxwormhole import api

    tree = ast.parse(inspect.getsource(api))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    routing = {"DecomposeRecurrent", "TemporalWormholes", "PlanWormholes", "InsertWormholes", "WrapFixedPoints",
               "ExplicitRecurrent", "resolve_temporal_pairs", "replace"}
    assert names & routing == set(), "api.py decides which passes see what"
    assert sum(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_passes" for n in ast.walk(tree)) == 1


def test_every_module_has_its_line_in_the_architecture_page():
    """docs/architecture.md says what each module is for; a module missing there is a room nobody can find."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = page.split("## Modules, one line each", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            listed.update(part.strip(" `") for part in line.split("|")[1].split(","))
    paths = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    covered = {p for p in paths if p in listed or any(p.startswith(d) for d in listed if d.endswith("/"))}
    assert sorted(paths - covered) == [], "modules without a line in docs/architecture.md"
