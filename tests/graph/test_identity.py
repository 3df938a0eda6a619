"""Identity: execution fields never change it; result-affecting fields change exactly the nodes downstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from trinity.graph.compile import compile_graph
from trinity.graph.identity import UnhashableValue, canonical_json, node_identity
from trinity.spec.loading import load_experiment

TINY = ROOT / "graphs" / "tiny.yaml"


def identities(path: Path, sets: list[str]) -> dict[str, str]:
    graph = compile_graph(load_experiment(path, sets))
    return {n: graph.nodes[n]["node"].identity for n in graph.nodes}


EXECUTION_CHANGES = [
    "execution.executor=slurm",
    "execution.run_root=/elsewhere",
    "execution.checkpoint.every=7",
    "execution.log_every=3",
    "execution.checkpoint.keep_last=9",
    "execution.checkpoint.keep_every=100",
    "execution.checkpoint.async=true",
    "execution.checkpoint.compression=zstd",
    "execution.slurm.partition=gpu",
    "execution.slurm.time_min={default: 5}",
    "execution.slurm.extra_sbatch={constraint: h200}",
    "parallel.micro_batch=2",
    "parallel.mfu=0.5",
    "parallel.accelerator.name=B300",
    "stages.extend.cp=1",
]


@pytest.mark.parametrize("change", EXECUTION_CHANGES)
def test_execution_fields_change_no_identity(change: str) -> None:
    assert identities(TINY, [change]) == identities(TINY, [])


def test_learning_rate_changes_pretrain_and_downstream_only() -> None:
    before = identities(TINY, [])
    after = identities(TINY, ["optim.muon.lr=0.02"])
    changed = {n for n in before if before[n] != after[n]}
    assert {"tokenizer", "prepare/phase1", "prepare/phase2", "prepare/phase3", "prepare/extend"}.isdisjoint(changed)
    expected = {"pretrain/phase1", "pretrain/phase2", "pretrain/phase3", "extend", "sft", "rl"}
    assert expected <= changed
    assert {n for n in changed if n.startswith("eval/")} == {n for n in before if n.startswith("eval/")}


def test_phase_mix_changes_only_its_prepare_and_what_follows() -> None:
    before = identities(TINY, [])
    after = identities(TINY, ["data.phases.phase2.mix.math=0.5"])
    changed = {n for n in before if before[n] != after[n]}
    assert "prepare/phase2" in changed and "pretrain/phase2" in changed
    assert not {"tokenizer", "prepare/phase1", "pretrain/phase1"} & changed
    # Phase 3 and the extension continue each source's stream where phase 2 stops: they follow it.
    assert {"prepare/phase3", "prepare/extend"} <= changed


def test_prepare_nodes_continue_the_previous_phase() -> None:
    graph = compile_graph(load_experiment(TINY))
    deps = {n: sorted(graph.predecessors(n)) for n in graph.nodes if n.startswith("prepare/")}
    assert deps == {
        "prepare/phase1": ["tokenizer"],
        "prepare/phase2": ["prepare/phase1", "tokenizer"],
        "prepare/phase3": ["prepare/phase2", "tokenizer"],
        "prepare/extend": ["prepare/phase3", "tokenizer"],
    }


def test_loader_change_does_not_reprepare() -> None:
    before = identities(TINY, [])
    after = identities(TINY, ["data.phases.phase1.loader={kind: sequential}"])
    assert before["prepare/phase1"] == after["prepare/phase1"]
    assert before["pretrain/phase1"] != after["pretrain/phase1"]


def test_sweep_of_two_learning_rates_shares_tokenizer_and_prepare(tmp_path: Path) -> None:
    text = TINY.read_text() + "sweep:\n  grid:\n    optim.muon.lr: [0.01, 0.02]\n"
    path = ROOT / "graphs" / ".sweep-test.yaml"
    path.write_text(text)
    try:
        graph = compile_graph(load_experiment(path))
    finally:
        path.unlink()
    ids = set(graph.nodes)
    assert "tokenizer" in ids and "prepare/phase1" in ids and "prepare/extend" in ids
    assert {"pretrain/phase1[muon.lr=0.01]", "pretrain/phase1[muon.lr=0.02]"} <= ids
    assert "pretrain/phase1" not in ids
    # each branch's first pretrain node reads the one shared prepare node
    for label in ("0.01", "0.02"):
        assert graph.nodes[f"pretrain/phase1[muon.lr={label}]"]["node"].deps == ("prepare/phase1",)
    assert graph.nodes["rl[muon.lr=0.02]"]["node"].deps == ("sft[muon.lr=0.02]",)
    single = identities(TINY, ["optim.muon.lr=0.02"])
    assert graph.nodes["pretrain/phase3[muon.lr=0.02]"]["node"].identity == single["pretrain/phase3"]


def test_floats_are_canonical_and_unhashables_refused() -> None:
    assert canonical_json({"lr": 1e-3}) == canonical_json({"lr": 0.001})
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})
    assert node_identity("x", {"lr": 1e-3}, []) != node_identity("x", {"lr": 2e-3}, [])
    with pytest.raises(UnhashableValue, match="NaN"):
        canonical_json({"lr": float("nan")})
    with pytest.raises(UnhashableValue, match="object"):
        canonical_json({"thing": object()})
