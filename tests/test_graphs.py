"""Every graph file of the repository (graphs/**/*.yaml, and the tests' own tests/graphs/*.yaml) loads
through the real loader, compiles to a well-formed DAG, and passes `trinity validate`.

The files are found by glob, so a new graph is covered the day it is added.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT, TEST_GRAPHS
from trinity.cli import app
from trinity.graph.compile import compile_graph, nodes_in_order
from trinity.graph.kinds import NODE_KINDS
from trinity.spec.loading import load_experiment

GRAPHS = sorted((ROOT / "graphs").glob("**/*.yaml")) + sorted(TEST_GRAPHS.glob("*.yaml"))
IDS = [str(g.relative_to(ROOT)) for g in GRAPHS]
runner = CliRunner()


def test_the_glob_finds_the_graphs_of_every_folder() -> None:
    found = set(IDS)
    assert {"graphs/tiny.yaml", "graphs/trinity-large.yaml", "tests/graphs/micro.yaml"} <= found
    assert {"graphs/ablations/rsdb-vs-sequential.yaml", "graphs/ablations/smebu-vs-sign.yaml"} <= found


@pytest.mark.parametrize("path", GRAPHS, ids=IDS)
def test_graph_compiles_to_a_well_formed_dag(path: Path) -> None:
    graph = compile_graph(load_experiment(path))
    assert graph.number_of_nodes() > 0 and nx.is_directed_acyclic_graph(graph)
    order = nodes_in_order(graph)
    ids = [node.id for node in order]
    assert len(ids) == len(set(ids)) == graph.number_of_nodes()  # each node once, under a unique id
    seen: set[str] = set()
    for node in order:
        assert node.kind in NODE_KINDS and graph.nodes[node.id]["node"] is node
        assert set(node.deps) <= seen, f"{node.id} depends on {set(node.deps) - seen}, not before it (or missing)"
        assert set(graph.predecessors(node.id)) == set(node.deps)  # the edges are exactly the deps
        seen.add(node.id)


@pytest.mark.parametrize("path", GRAPHS, ids=IDS)
def test_graph_passes_trinity_validate(path: Path) -> None:
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_the_distributed_tiny_graph_validates_with_four_ranks() -> None:
    spec = load_experiment(ROOT / "graphs" / "tiny-distributed.yaml").spec
    par = spec.parallel
    assert (par.nodes, par.gpus_per_node, par.fsdp_group, par.ep, par.replicas) == (1, 4, 2, 2, 2)
    assert all(par.divides_batch(b.sequences) for b in spec.optim.batch)


def test_every_graph_written_in_the_guide_validates(tmp_path: Path) -> None:
    """The ```yaml graph files of docs/guide.md, saved where their comment says, pass `trinity validate`
    (a user copies them as they are)."""
    import re

    guide = (ROOT / "docs" / "guide.md").read_text()
    blocks = re.findall(r"```yaml\n# (graphs/[\w.-]+\.yaml)\n(.*?)```", guide, re.S)
    assert blocks, "the guide's example graph (a ```yaml block starting with '# graphs/NAME.yaml') is gone"
    for name, text in blocks:
        path = ROOT / name
        assert not path.exists(), f"{name} would overwrite a graph of the repository"
        try:
            path.write_text(text)
            result = runner.invoke(app, ["validate", str(path)])
        finally:
            path.unlink(missing_ok=True)
        assert result.exit_code == 0, f"docs/guide.md's {name}: {result.output}"
