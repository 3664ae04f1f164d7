"""The package's layers, read from every import in its source (at module level and inside
functions alike): operators know nothing of fitness, search or experiments; fitness
nothing of search or experiments; search nothing of experiments; nothing imports the
CLI; no two modules import each other, however indirectly; one module name per idea."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"
LAYERS = {"operators": 0, "fitness": 1, "search": 2, "experiments": 3}


def _module(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: Path) -> set[str]:
    """Every evomerge module ``path`` imports (``from evomerge.x import y`` names y when it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("evomerge")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evomerge"):
            found.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if (package.parent / Path(*sub.split("."))).with_suffix(".py").is_file():
                    found.add(sub)
    return found


def _graph(package: Path = PACKAGE) -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in package.rglob("*.py"):
        name = _module(path, package)
        graph.add_node(name)
        for target in _imports(path, package):
            if target != name:
                graph.add_edge(name, target)
    graph.remove_node("evomerge")  # the package's own __init__ (its version only)
    return graph


def _upward(graph: nx.DiGraph) -> list[tuple[str, str]]:
    """Imports from a lower layer into a higher one."""
    return [
        (a, b)
        for a, b in graph.edges
        if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)  # type: ignore[operator]
    ]


def _cycles(graph: nx.DiGraph) -> list[set[str]]:
    return [c for c in nx.strongly_connected_components(graph) if len(c) > 1]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_lower_layers_never_import_higher_ones():
    assert not _upward(_graph())


def test_nothing_imports_the_cli():
    assert not [a for a, b in _graph().edges if b == "evomerge.cli"]


def test_no_import_cycles():
    assert not _cycles(_graph())


def test_one_module_name_per_idea():
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.stem, []).append(_module(path, PACKAGE))
    assert not {k: v for k, v in names.items() if len(v) > 1}


def test_the_boundary_checks_can_fail(tmp_path):
    """A copy of the package with one import added inside a function of the search
    space (as it once imported the experiment config): an upward import and a cycle."""
    fake = tmp_path / "evomerge"
    for path in PACKAGE.rglob("*.py"):
        target = fake / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    space = fake / "search" / "space.py"
    space.write_text(space.read_text() + "\n\ndef _f():\n    from evomerge.experiments.run import prepare\n")
    graph = _graph(fake)
    assert _upward(graph) == [("evomerge.search.space", "evomerge.experiments.run")]
    assert any({"evomerge.search.space", "evomerge.experiments.run"} <= c for c in _cycles(graph))
