"""Sweep branch labels (trinity/graph/compile.py): a label becomes part of node ids, so of folder names;
whatever the grid's values are, each node id is a relative path under RUN/nodes, different branches
never share a node id (nor a folder on a case-insensitive file system), and plain values read as
before (`muon.lr=0.02`).

The folder check is independent of the id rule: the path is normalised with os.path and must stay
exactly `nodes/<id>`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cli_runs import trinity
from tests.conftest import ROOT
from trinity.errors import SpecError
from trinity.graph.compile import branches, compile_graph
from trinity.run.layout import RunDir
from trinity.spec.experiment import MAX_BRANCHES
from trinity.spec.loading import load_experiment

TINY = ROOT / "graphs" / "tiny.yaml"
ABLATION = ROOT / "graphs" / "ablations" / "rsdb-vs-sequential.yaml"


def _stays_under_nodes(node_id: str) -> bool:
    base = "/r/nodes"
    joined = os.path.normpath(os.path.join(base, node_id))
    return joined == f"{base}/{node_id}" and "\x00" not in node_id and "\n" not in node_id


def _check_ids(graph_ids: list[str], tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    for node_id in graph_ids:
        assert _stays_under_nodes(node_id), node_id
        assert run.node(node_id).root == tmp_path / "run" / "nodes" / node_id
    folded = [n.casefold() for n in graph_ids]
    assert len(set(folded)) == len(folded)  # one folder per node even where case is ignored


def test_values_with_slashes_quotes_and_brackets_give_safe_distinct_ids(tmp_path: Path) -> None:
    tokens = ['["<|doc|>", "<|pad|>", "../../../victim"]', '["<|doc|>", "<|pad|>", "x\\"]; y"]', '["<|doc|>"]']
    grid = f"sweep={{grid: {{tokenizer.special_tokens: [{', '.join(tokens)}]}}}}"
    loaded = load_experiment(TINY, [grid])
    graph = compile_graph(loaded)
    labels = [b.label for b in branches(loaded)]
    assert len(set(labels)) == 3
    pretrain = [n for n in graph if n.startswith("pretrain/phase1")]
    assert len(pretrain) == 3  # one node per branch: the special tokens change every node
    _check_ids(list(graph), tmp_path)
    for label in labels:
        assert "/" not in label and '"' not in label and "<" not in label and ".." not in label


def test_sections_of_one_kind_are_told_apart() -> None:
    # Both values are `rsdb` sections; the old label `main.loader=rsdb` was the same for both, and
    # the second branch's training node was silently dropped from the graph.
    loaders = "[{kind: rsdb, buffer_size: 64, workers: 1}, {kind: rsdb, buffer_size: 32, workers: 1}]"
    graph = compile_graph(load_experiment(ABLATION, [f"sweep={{grid: {{data.phases.main.loader: {loaders}}}}}"]))
    pretrain = sorted(n for n in graph if n.startswith("pretrain/"))
    assert len(pretrain) == 2, pretrain
    assert all(n.startswith("pretrain/main[main.loader=rsdb~") for n in pretrain)
    identities = {graph.nodes[n]["node"].identity for n in pretrain}
    assert len(identities) == 2


def test_identical_points_share_a_label_and_their_nodes() -> None:
    loaded = load_experiment(TINY, ["sweep={grid: {optim.muon.lr: [0.01, 0.02], model.embedding_scale: [none, none]}}"])
    labels = [b.label for b in branches(loaded)]
    assert labels == ["muon.lr=0.01,model.embedding_scale=none"] * 2 + ["muon.lr=0.02,model.embedding_scale=none"] * 2
    assert len([n for n in compile_graph(loaded) if n.startswith("pretrain/phase1")]) == 2


def test_values_that_differ_only_in_case_get_different_folders(tmp_path: Path) -> None:
    jsonl = "data.sources.docs={kind: jsonl, paths: [d.jsonl]}"
    loaded = load_experiment(ABLATION, [jsonl, "sweep={grid: {data.sources.docs.text_field: [Text, text]}}"])
    ids = list(compile_graph(loaded))
    _check_ids(ids, tmp_path)
    assert len([n for n in ids if n.startswith("prepare/")]) == 2


def test_plain_values_read_as_themselves() -> None:
    loaded = load_experiment(TINY, ["sweep={grid: {optim.muon.lr: [0.01, 2.0e-3, 1e-05], seed: [-1, 3]}}"])
    assert [b.label for b in branches(loaded)] == [
        "muon.lr=0.01,seed=-1",
        "muon.lr=0.01,seed=3",
        "muon.lr=0.002,seed=-1",
        "muon.lr=0.002,seed=3",
        "muon.lr=1e-05,seed=-1",
        "muon.lr=1e-05,seed=3",
    ]


def test_a_long_label_becomes_a_digest(tmp_path: Path) -> None:
    keys = ["optim.muon.lr", "optim.adamw.lr", "optim.muon.weight_decay", "optim.adamw.weight_decay", "seed"]
    grid = ", ".join(f"{k}: [0.{'1' * 25}, 0.{'2' * 25}]" if k != "seed" else f"{k}: [1, 2]" for k in keys)
    loaded = load_experiment(TINY, [f"sweep={{grid: {{{grid}}}}}"])
    labels = [b.label for b in branches(loaded)]
    assert len(set(labels)) == len(labels) == 32
    assert all(label.startswith("~") and len(label) == 11 for label in labels)
    _check_ids(list(compile_graph(loaded)), tmp_path)


def test_an_empty_value_list_is_a_located_error() -> None:
    # It used to end in StopIteration (exit 1): no branch at all, and plan took the first one.
    result = trinity("plan", str(TINY), "--set", "sweep={grid: {optim.muon.lr: []}}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sweep.grid.optim.muon.lr" in result.stderr and "at least 1" in result.stderr


def test_the_number_of_branches_is_bounded() -> None:
    values = ", ".join(str(i) for i in range(1, 40))
    with pytest.raises(SpecError) as info:
        load_experiment(TINY, [f"sweep={{grid: {{optim.muon.lr: [{values}], seed: [{values}]}}}}"])
    assert any(f"sweep.grid makes 1521 branches (39 x 39); at most {MAX_BRANCHES}" in line for line in info.value.lines)


def test_a_node_is_labelled_by_the_keys_its_identity_depends_on() -> None:
    """In a `muon.lr x seed` sweep the tokenizer and prepare nodes depend on the seed only: one per seed,
    labelled `[seed=N]` and shared by that seed's learning rates; training nodes keep the whole label.
    Each node is the one the branch compiled alone (no sweep) holds: same identity, same dependencies."""
    loaded = load_experiment(TINY, ["sweep={grid: {optim.muon.lr: [0.01, 0.02], seed: [1, 2]}}"])
    graph = compile_graph(loaded)
    assert sorted(n for n in graph if n.startswith("tokenizer")) == ["tokenizer[seed=1]", "tokenizer[seed=2]"]
    prepares = sorted(n for n in graph if n.startswith("prepare/phase1"))
    assert prepares == ["prepare/phase1[seed=1]", "prepare/phase1[seed=2]"]
    assert len([n for n in graph if n.startswith("pretrain/phase1")]) == 4
    assert graph.nodes["pretrain/phase1[muon.lr=0.02,seed=2]"]["node"].deps == ("prepare/phase1[seed=2]",)
    for lr in (0.01, 0.02):
        for seed in (1, 2):
            alone = compile_graph(load_experiment(TINY, [f"optim.muon.lr={lr}", f"seed={seed}"]))
            for base, node in alone.nodes(data="node"):
                label = f"seed={seed}" if node.kind in ("tokenizer", "prepare") else f"muon.lr={lr},seed={seed}"
                swept = graph.nodes[f"{base}[{label}]"]
                assert swept["node"].identity == node.identity, base
                assert swept["node"].branch == label
                assert swept["spec"].seed == seed
