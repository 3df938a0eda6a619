"""The floor plan of the package: which layer may import which, no import cycles, no private names.

From the ground up (DESIGN.md, "Floors"); a module imports only from its own package, a floor
below, or a neighbour on its floor that is listed in SIDEWAYS. Every import counts: at module
level, inside functions (lazy imports) and under TYPE_CHECKING alike, since each is a dependency
someone has to read past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trinity"

FLOORS: dict[str, int] = {
    "errors": 0,
    "spec": 1,
    "graph": 2,
    "run": 2,
    "model": 3,
    "data": 3,
    "optim": 4,
    "store": 4,
    "distributed": 4,
    "evals": 5,
    "rl": 5,
    "interop": 5,
    "nodes": 6,
    "execute": 7,
    "cli": 8,
    "cli_errors": 8,
    "cli_render": 8,
    "cli_watch": 8,
}
"""Each top-level module or package of trinity and its floor."""

SIDEWAYS: frozenset[tuple[str, str]] = frozenset(
    {
        ("run", "graph"),  # graph.json is read back typed with the graph's node kinds
        ("distributed", "optim"),  # sharded Muon is the optimizer's distributed form
        ("evals", "rl"),  # the arithmetic eval scores with the RL rollout's sampler
        ("cli", "cli_render"),  # the command line and how it draws tables
        ("cli", "cli_errors"),  # the commands and how each reports an error
        ("cli_errors", "cli_render"),  # error lines are made printable as table cells are
        ("cli", "cli_watch"),  # the command line and its live view
        ("cli_watch", "cli_render"),  # the live view draws values as the tables do
    }
)
"""Imports between neighbours on one floor, in the one direction allowed."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, imported trinity module, names taken from it) for every import in `source`."""
    found: list[tuple[int, str, list[str]]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("trinity")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "trinity" or base.startswith("trinity."):
                found.append((node.lineno, base, [a.name for a in node.names]))
    return found


def layer(module: str) -> str:
    """trinity.store.checkpoint -> store; trinity.cli -> cli; trinity -> errors (the root is ground)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every broken rule in `sources` (module name -> (source, is_package))."""
    problems: list[str] = []
    for module, (source, is_package) in sorted(sources.items()):
        own = layer(module)
        if own not in FLOORS:
            problems.append(f"{module}: top-level module {own!r} has no floor in FLOORS")
            continue
        for line, target, names in imports_of(source, module, is_package):
            other = layer(target)
            if other not in FLOORS:
                problems.append(f"{module}:{line}: imports {target}, which has no floor in FLOORS")
            elif other != own and FLOORS[other] >= FLOORS[own] and (own, other) not in SIDEWAYS:
                problems.append(
                    f"{module}:{line}: imports {target} (floor {FLOORS[other]} '{other}') "
                    f"from floor {FLOORS[own]} '{own}': upward or sideways"
                )
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.append(f"{module}:{line}: imports private names {private} of {target}")
    return problems


def module_graph(sources: dict[str, tuple[str, bool]]) -> nx.DiGraph:
    """Module -> module imports inside trinity (a `from pkg import mod` counts as importing pkg.mod)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(sources)
    for module, (source, is_package) in sources.items():
        for _, target, names in imports_of(source, module, is_package):
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in sources] or [target]
            graph.add_edges_from((module, t) for t in targets if t in sources and t != module)
    return graph


def package_sources() -> dict[str, tuple[str, bool]]:
    return {
        module_name(path, PACKAGE): (path.read_text(), path.name == "__init__.py")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_import_goes_down_the_floors() -> None:
    assert violations(package_sources()) == []


def test_no_import_cycles_between_packages_or_modules() -> None:
    sources = package_sources()
    modules = module_graph(sources)
    packages = nx.DiGraph((layer(a), layer(b)) for a, b in modules.edges if layer(a) != layer(b))
    assert list(nx.simple_cycles(packages)) == []
    assert sorted(sorted(c) for c in nx.simple_cycles(modules)) == []


def test_every_top_level_module_has_a_floor() -> None:
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    top -= {"__init__", "__pycache__"}
    assert top <= set(FLOORS)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("trinity.store.catalog", "from trinity.execute.run import decide\n", "upward or sideways"),
        ("trinity.model.moe", "def f():\n    from trinity.store import telemetry\n", "upward or sideways"),
        ("trinity.run.status", "from ..execute import run\n", "upward or sideways"),
        ("trinity.optim.muon", "import trinity.distributed.mesh\n", "upward or sideways"),
        ("trinity.spec.model", "from trinity.errors import SpecError\n", None),
        ("trinity.nodes.rl", "from trinity.nodes.trainer import Trainer\n", None),
        ("trinity.store.sql", "from trinity.store.catalog import _ALLOWED\n", "private names"),
        ("trinity.widgets", "import os\n", "has no floor"),
    ],
)
def test_the_checker_catches_an_injected_import(module: str, source: str, expected: str | None) -> None:
    """The rules above are checked by `violations`; an upward, sideways or private import is caught."""
    found = violations({module: (source, False)})
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0]


def test_the_cycle_check_catches_an_injected_cycle() -> None:
    sources = {
        "trinity.store.a": ("from trinity.store.b import x\n", False),
        "trinity.store.b": ("def f():\n    from trinity.store import a\n", False),
    }
    assert [sorted(c) for c in nx.simple_cycles(module_graph(sources))] == [["trinity.store.a", "trinity.store.b"]]
