"""Evals during training in the compiled graph (trinity.graph.during): one node per intermediate checkpoint,
its identity and its `after_checkpoint`, the spec rules of `every`, and graph.json's field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import pytest

from tests.conftest import compose
from trinity.errors import SpecError
from trinity.graph import during
from trinity.graph.compile import compile_graph
from trinity.graph.during import AfterCheckpoint
from trinity.run.graph import GraphNode
from trinity.spec.loading import load_experiment

PHASE_STEPS = (59, 30)
"""Optimizer steps of the micro graph's phases (tests/graphs/micro.yaml; asserted below)."""


def heldout(**fields: Any) -> dict[str, Any]:
    return {"kind": "heldout_loss", "name": "heldout", "seq_len": 64, **fields}


def graph_of(tmp_path: Path, *evals: dict[str, Any], checkpoint_every: int = 20) -> nx.DiGraph:
    path = compose(
        tmp_path / "g.yaml",
        "micro.yaml",
        stages={"evals": list(evals)},
        execution={"checkpoint": {"every": checkpoint_every}},
    )
    loaded = load_experiment(path)
    assert loaded.spec.pretrain_steps() == PHASE_STEPS
    return compile_graph(loaded)


def during_nodes(graph: nx.DiGraph) -> dict[str, tuple[str, int]]:
    """Intermediate-checkpoint eval id -> (training node, step), from the nodes' `after_checkpoint`."""
    out = {}
    for node_id in graph:
        after = graph.nodes[node_id]["node"].after_checkpoint
        if after is not None:
            out[node_id] = (after.node, after.step)
    return out


def test_every_makes_one_node_per_intermediate_checkpoint(tmp_path: Path) -> None:
    graph = graph_of(tmp_path, heldout(after=["pretrain", "pretrain:phase2"], every=20))
    end1, end2 = PHASE_STEPS[0], sum(PHASE_STEPS)
    # Closed form: the multiples of 20 below the stage's last step, each in the phase whose steps hold it.
    expected = {
        f"eval/heldout@pretrain@step{s}": ("pretrain/phase1" if s <= end1 else "pretrain/phase2", s)
        for s in range(20, end2, 20)
    }
    expected |= {
        f"eval/heldout@pretrain:phase2@step{s}": ("pretrain/phase2", s) for s in range(20, end2, 20) if s > end1
    }
    assert during_nodes(graph) == expected
    assert sorted(s for _, s in expected.values()) == [20, 40, 60, 60, 80, 80]
    for node_id, (trainer, step) in expected.items():
        node = graph.nodes[node_id]["node"]
        assert node.kind == "eval" and node.payload["step"] == step
        assert set(node.deps) == {trainer, "prepare/phase1", "prepare/phase2"}
        assert graph.has_edge(trainer, node_id)
    identities = [graph.nodes[n]["node"].identity for n in expected]
    assert len(set(identities)) == len(identities)  # one per checkpoint: the step is part of it

    # `every` adds nodes; the final evals score what they scored before, under the same identity.
    plain = graph_of(tmp_path, heldout(after=["pretrain", "pretrain:phase2"]))
    assert during_nodes(plain) == {}
    for final in ("eval/heldout@pretrain", "eval/heldout@pretrain:phase2"):
        assert graph.nodes[final]["node"].identity == plain.nodes[final]["node"].identity


def test_every_checkpoint_follows_the_checkpoint_cadence(tmp_path: Path) -> None:
    graph = graph_of(tmp_path, heldout(after=["pretrain:phase1"], every="checkpoint"), checkpoint_every=15)
    assert during_nodes(graph) == {
        f"eval/heldout@pretrain:phase1@step{s}": ("pretrain/phase1", s) for s in (15, 30, 45)
    }  # 59 is the final checkpoint: eval/heldout@pretrain:phase1 scores it
    explicit = graph_of(tmp_path, heldout(after=["pretrain:phase1"], every=15), checkpoint_every=15)
    assert {n: graph.nodes[n]["node"].identity for n in graph} == {
        n: explicit.nodes[n]["node"].identity for n in explicit
    }


def test_every_must_fall_on_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        graph_of(tmp_path, heldout(after=["pretrain"], every=30))
    lines = (tmp_path / "g.yaml").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "every: 30" in text)
    assert f"g.yaml:{line}" in str(caught.value)
    assert "stages.evals.0.every = 30 must be a multiple of execution.checkpoint.every (20)" in str(caught.value)


def test_every_of_a_stage_that_starts_from_init_is_refused(tmp_path: Path) -> None:
    path = compose(tmp_path / "g.yaml", "micro.yaml", stages={"evals": [heldout(after=["pretrain:phase2"], every=20)]})
    # phase2 starts from phase1's checkpoint at step 40 instead of continuing it: its step numbers follow the source
    loaded = load_experiment(path, ["data.phases.1.init={from: pretrain/phase1@40}"])
    with pytest.raises(SpecError) as caught:
        compile_graph(loaded)
    assert "stages.evals.0.every cannot evaluate the intermediate checkpoints of pretrain/phase2" in str(caught.value)
    assert "starts from `init`" in str(caught.value)


def test_too_many_intermediate_evals_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(during, "MAX_DURING_NODES", 3)
    with pytest.raises(SpecError) as caught:
        graph_of(tmp_path, heldout(after=["pretrain"], every=20))
    assert "would evaluate 4 intermediate checkpoints" in str(caught.value)


def test_graph_json_keeps_after_checkpoint_and_reads_older_files() -> None:
    entry = {"id": "eval/h@pretrain@step20", "kind": "eval", "identity": "x", "deps": ["pretrain/p"]}
    assert GraphNode.from_json(entry).after_checkpoint is None  # graph.json written before the field
    node = GraphNode.from_json({**entry, "after_checkpoint": {"node": "pretrain/p", "step": 20}})
    assert node.after_checkpoint == AfterCheckpoint("pretrain/p", 20)
    assert GraphNode.from_json(node.to_json()) == node
    assert "after_checkpoint" not in GraphNode.from_json(entry).to_json()
    with pytest.raises(ValueError):  # RunGraph.load reports it as a damaged graph.json
        GraphNode.from_json({**entry, "after_checkpoint": {"node": "pretrain/p"}})
