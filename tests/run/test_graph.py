"""graph.json read back typed (trinity/run/graph.py): the nodes as compiled, GraphNode's JSON round trip,
upstream() in networkx's distance order, dep(), the branch spec of a sweep node, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest

from tests.conftest import ROOT, TEST_GRAPHS
from trinity.errors import RunError
from trinity.execute.run import write_run
from trinity.graph.compile import nodes_in_order
from trinity.graph.kinds import NODE_KINDS
from trinity.run.graph import GraphNode, RunGraph
from trinity.run.layout import RunDir
from trinity.spec.loading import load_experiment


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunGraph, nx.DiGraph]:
    """The micro graph with every stage, written as a run writes it (nothing runs), and its compiled DAG."""
    run, compiled = write_run(load_experiment(TEST_GRAPHS / "micro-post.yaml"), tmp_path_factory.mktemp("g") / "run")
    return RunGraph.load(run), compiled


def test_load_holds_the_compiled_nodes_in_order(written: tuple[RunGraph, nx.DiGraph]) -> None:
    graph, compiled = written
    assert graph.name == "micro"
    order = nodes_in_order(compiled)
    assert list(graph.nodes) == [n.id for n in order]
    for node in order:
        entry = graph[node.id]
        assert (entry.kind, entry.identity, entry.deps, entry.target) == (
            node.kind,
            node.identity,
            node.deps,
            node.target,
        )
        assert entry.flat_spec["model.moe.n_experts"] == 8 and entry.spec_file == "spec.yaml"
    assert set(graph.digraph.edges) == set(compiled.edges)
    assert "sft" in graph and "pretrain/phase9" not in graph


def test_graph_node_round_trips_through_json(written: tuple[RunGraph, nx.DiGraph]) -> None:
    graph, _ = written
    raw = json.loads(graph.run.graph_json.read_text())["nodes"]
    assert len(raw) == len(graph.nodes)
    for entry in raw:
        node = GraphNode.from_json(entry)
        assert node.to_json() == entry  # every field graph.json holds, and nothing else
        again = GraphNode.from_json(json.loads(json.dumps(node.to_json())))
        assert again == node  # the compared fields
        assert (again.flat_spec, again.payload_digests) == (node.flat_spec, node.payload_digests)  # and the rest


def test_upstream_is_nearest_first_then_by_id_as_networkx_measures_it(written: tuple[RunGraph, nx.DiGraph]) -> None:
    graph, compiled = written
    # By hand: the held-out eval after extension reads both phase stores directly, the extension store via extend.
    assert [n.id for n in graph.upstream("eval/heldout@extend", "prepare")] == [
        "prepare/phase1",
        "prepare/phase2",
        "prepare/extend",
    ]
    assert [n.id for n in graph.upstream("rl", "pretrain")] == ["pretrain/phase2", "pretrain/phase1"]
    assert graph.upstream("tokenizer", "prepare") == []
    for node_id in graph.nodes:
        for kind in NODE_KINDS:
            ancestors = [a for a in nx.ancestors(compiled, node_id) if compiled.nodes[a]["node"].kind == kind]
            distance = {a: nx.shortest_path_length(compiled, a, node_id) for a in ancestors}
            expected = sorted(ancestors, key=lambda a: (distance[a], a))
            assert [n.id for n in graph.upstream(node_id, kind)] == expected, (node_id, kind)


def test_dep_finds_a_direct_dependency_by_kind_and_target(written: tuple[RunGraph, nx.DiGraph]) -> None:
    graph, _ = written
    found = graph.dep("pretrain/phase2", "pretrain")
    assert found is not None and found.id == "pretrain/phase1"
    found = graph.dep("pretrain/phase2", "prepare", "phase2")
    assert found is not None and found.id == "prepare/phase2"
    assert graph.dep("pretrain/phase2", "prepare", "phase1") is None  # a dependency of a dependency is not direct
    assert graph.dep("rl", "extend") is None
    assert graph.dep("sft", "tokenizer") is graph["tokenizer"]


def test_a_sweep_node_runs_with_its_branch_spec(tmp_path: Path) -> None:
    run, _ = write_run(load_experiment(ROOT / "graphs" / "ablations" / "smebu-vs-sign.yaml"), tmp_path / "run")
    graph = RunGraph.load(run)
    kinds = {}
    for node in graph.nodes.values():
        if node.kind == "pretrain":
            assert node.branch and node.spec_file.startswith("branches/")
            kinds[node.id] = graph.spec(node).stability.balancing.kind
    assert sorted(kinds.values()) == ["none"] * 3 + ["sign"] * 3 + ["smebu"] * 3
    assert all(f"balancing.kind={kind}" in node_id for node_id, kind in kinds.items())
    # The tokenizer depends on the seed, not on the balancing: one per seed, shared by that seed's branches.
    shared = graph["tokenizer[seed=1]"]
    assert shared.branch == "seed=1" and graph.spec(shared).name == "ablation-smebu-vs-sign"
    assert graph.spec(shared).seed == 1


def test_load_refuses_a_folder_that_is_not_a_run_and_an_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="not a trinity run directory"):
        RunGraph.load(RunDir(tmp_path / "nothing"))
    with pytest.raises(RunError, match="unknown kind 'train'"):
        GraphNode.from_json({"id": "x", "kind": "train", "identity": "i"})


def test_load_refuses_node_ids_that_are_not_relative_paths_and_unlisted_deps(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    entry = {"kind": "tokenizer", "identity": "i", "deps": []}
    for bad_id, problem in (("../x", "'..' segment"), ("/abs", "absolute"), ("a\nb", "control character")):
        run.graph_json.write_text(json.dumps({"name": "g", "nodes": [{**entry, "id": bad_id}]}))
        with pytest.raises(RunError, match=problem) as info:
            RunGraph.load(run)
        assert str(run.graph_json) in str(info.value)
    nodes = [{**entry, "id": "tokenizer"}, {**entry, "kind": "prepare", "id": "prepare/p", "deps": ["tokenizr"]}]
    run.graph_json.write_text(json.dumps({"name": "g", "nodes": nodes}))
    with pytest.raises(RunError, match=r"'prepare/p' depends on \['tokenizr'\], which it does not list"):
        RunGraph.load(run)
