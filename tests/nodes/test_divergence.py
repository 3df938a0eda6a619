"""The way out a diverged node names works: its `--set` overrides, applied to the graph as `trinity run GRAPH
--set ...` applies them, give the diverged node (and what follows it) a new identity with half the learning
rate, and leave every node before it reused. `trinity resume` (the stored spec) cannot do that."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import compose
from trinity.graph.compile import compile_graph, nodes_in_order
from trinity.nodes.divergence import lr_fields, relaunch_sets
from trinity.spec.loading import load_experiment


def _identities(graph: Path, sets: list[str]) -> dict[str, str]:
    return {n.id: n.identity for n in nodes_in_order(compile_graph(load_experiment(graph, sets)))}


@pytest.mark.parametrize(
    ("kind", "node", "rerun"),
    [
        ("pretrain", "pretrain/phase1", {"pretrain/phase1", "pretrain/phase2", "extend", "sft", "rl"}),
        ("extend", "extend", {"extend", "sft", "rl"}),
        ("sft", "sft", {"sft", "rl"}),
        ("rl", "rl", {"rl"}),
    ],
)
def test_relaunch_sets_halve_the_lr_and_rerun_from_the_diverged_node(
    tmp_path: Path, kind: str, node: str, rerun: set[str]
) -> None:
    graph = compose(tmp_path / "post.yaml", "micro-post.yaml")
    before_spec = load_experiment(graph, []).spec
    sets = relaunch_sets(before_spec, kind)
    after_spec = load_experiment(graph, sets).spec
    before, after = lr_fields(before_spec, kind), lr_fields(after_spec, kind)
    assert before and after == {path: value / 2 for path, value in before.items()}
    old, new = _identities(graph, []), _identities(graph, sets)
    changed = {n for n in new if old.get(n) != new[n]}
    training = {"pretrain/phase1", "pretrain/phase2", "extend", "sft", "rl"}
    assert node in changed and changed & training == rerun
    assert {n for n in new if n.startswith(("tokenizer", "prepare/"))}.isdisjoint(changed)
