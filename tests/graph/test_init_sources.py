"""`init:` sources at compile time (trinity.graph.init_sources): the dependency edge, identities that
follow the source, one shared upstream in a cooldown sweep, and located errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import compose
from trinity.cli import app
from trinity.errors import SpecError
from trinity.graph.compile import compile_graph
from trinity.spec.loading import load_experiment

runner = CliRunner()
LOADER = {"kind": "rsdb", "buffer_size": 16, "workers": 1}
PHASE1 = {
    "name": "phase1",
    "tokens": 30000,
    "seq_len": 64,
    "mix": {"docs": 2.0, "math": 1.0},
    "loader": LOADER,
}  # 59 steps, checkpoints every 20
DECAY = {"name": "decay", "tokens": 4000, "seq_len": 64, "mix": {"docs": 1.0, "math": 1.0}, "loader": LOADER}
DECAY_LR = {"kind": "continue", "from_fraction": 1.0, "to_fraction": 0.0, "decay": "linear"}


def graph_with(tmp_path: Path, init: dict[str, Any], name: str = "g.yaml", **extra: Any) -> Path:
    phases = [PHASE1, {**DECAY, "init": init, "lr": DECAY_LR}]
    return compose(tmp_path / name, "micro.yaml", data={"phases": phases}, **extra)


def nodes(path: Path) -> dict[str, Any]:
    graph = compile_graph(load_experiment(path))
    return {n: graph.nodes[n]["node"] for n in graph}


def test_cooldown_sweep_shares_the_stable_phase_and_forks_the_decay(tmp_path: Path) -> None:
    path = graph_with(
        tmp_path, {"from": "pretrain/phase1", "step": 20}, sweep={"grid": {"data.phases.decay.init.step": [20, 40, 59]}}
    )
    found = nodes(path)
    decays = sorted(n for n in found if n.startswith("pretrain/decay"))
    assert decays == [f"pretrain/decay[init.step={s}]" for s in (20, 40, 59)]
    assert "pretrain/phase1" in found  # one stable phase, shared by the three branches
    assert all(found[d].deps == ("prepare/decay", "pretrain/phase1") for d in decays)
    assert len({found[d].identity for d in decays}) == 3


def test_identity_follows_the_source_step_and_node(tmp_path: Path) -> None:
    at20 = nodes(graph_with(tmp_path, {"from": "pretrain/phase1@20"}, "a.yaml"))
    at40 = nodes(graph_with(tmp_path, {"from": "pretrain/phase1@40"}, "b.yaml"))
    final = nodes(graph_with(tmp_path, {"from": "pretrain/phase1"}, "c.yaml"))
    ids = {g["pretrain/decay"].identity for g in (at20, at40, final)}
    assert len(ids) == 3
    assert at20["pretrain/phase1"].identity == at40["pretrain/phase1"].identity  # the source itself is unchanged
    # The source's identity enters through the edge: another seed changes the source and so the stage.
    reseeded = nodes(graph_with(tmp_path, {"from": "pretrain/phase1@20"}, "d.yaml", seed=1))
    assert reseeded["pretrain/decay"].identity != at20["pretrain/decay"].identity


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ({"from": "pretrain/nope"}, "names node 'pretrain/nope', which this graph does not have (training nodes: "),
        ({"from": "prepare/phase1"}, "names 'prepare/phase1', a prepare node; a stage starts from a training node"),
        ({"from": "pretrain/phase1@30"}, "names step 30 of 'pretrain/phase1', which commits no checkpoint there"),
        ({"from": "pretrain/phase1@80"}, "its last step 59"),
        ({"run": "missing-run", "node": "pretrain/phase1"}, "is not a run directory (no graph.json)"),
        ({"hf": "missing-hf"}, "is not a Hugging Face model directory (no config.json)"),
    ],
)
def test_a_bad_source_is_a_located_error_with_exit_2(tmp_path: Path, init: dict[str, Any], message: str) -> None:
    path = graph_with(tmp_path, init)
    with pytest.raises(SpecError) as exc:
        compile_graph(load_experiment(path))
    assert "g.yaml:" in str(exc.value) and "data.phases.1.init." in str(exc.value) and message in str(exc.value)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_a_cycle_is_refused(tmp_path: Path) -> None:
    phases = [{**PHASE1, "init": {"from": "pretrain/phase2"}}, {**DECAY, "name": "phase2"}]
    path = compose(tmp_path / "g.yaml", "micro.yaml", data={"phases": phases})
    with pytest.raises(SpecError, match=r"makes a cycle: .*pretrain/phase1 -> .*pretrain/phase2"):
        compile_graph(load_experiment(path))


def fake_run(root: Path, identity: str, steps: tuple[int, ...] = (20,), final: int | None = 59) -> Path:
    """A run directory as trinity.run.layout writes it: graph.json and pretrain/phase1's checkpoints."""
    node = root / "nodes" / "pretrain" / "phase1"
    for step in steps:
        (node / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (node / "checkpoints" / f"step-{step:08d}" / "COMMITTED").write_text(json.dumps({"step": step}))
    if final is not None:
        (node / "outputs").mkdir(parents=True)
        (node / "outputs" / "final.json").write_text(json.dumps({"checkpoint": "x", "step": final, "tokens": 1}))
    entries = [
        {"id": "pretrain/phase1", "kind": "pretrain", "identity": identity},
        {"id": "tokenizer", "kind": "tokenizer", "identity": "t"},
    ]
    (root / "graph.json").write_text(json.dumps({"name": "other", "nodes": entries}))
    return root


def test_another_runs_node_enters_by_its_identity_and_step(tmp_path: Path) -> None:
    fake_run(tmp_path / "other", "a" * 64)
    decay = lambda init, name: nodes(graph_with(tmp_path, init, name))["pretrain/decay"]  # noqa: E731
    base = decay({"run": "other", "node": "pretrain/phase1", "step": 20}, "a.yaml")
    final = decay({"run": "other", "node": "pretrain/phase1"}, "b.yaml")
    assert base.deps == ("prepare/decay",) and base.identity != final.identity
    assert base.payload["init"] == {
        "source": "run",
        "node": "pretrain/phase1",
        "identity": "a" * 64,
        "step": 20,
        "optimizer": False,
    }
    fake_run(tmp_path / "rerun", "b" * 64)  # the same node re-run with another seed: another identity
    assert decay({"run": "rerun", "node": "pretrain/phase1", "step": 20}, "c.yaml").identity != base.identity


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ({"node": "pretrain/nope"}, "the run has no node 'pretrain/nope' (training nodes: pretrain/phase1)"),
        ({"node": "tokenizer"}, "a tokenizer node, not a training node"),
        ({"node": "pretrain/phase1", "step": 40}, "no committed checkpoint at step 40 (committed: step-00000020)"),
    ],
)
def test_another_run_missing_node_or_step(tmp_path: Path, init: dict[str, Any], message: str) -> None:
    fake_run(tmp_path / "other", "a" * 64)
    with pytest.raises(SpecError, match=r"g\.yaml:\d+: data\.phases\.1\.init\.run = 'other': ") as exc:
        compile_graph(load_experiment(graph_with(tmp_path, {"run": "other", **init})))
    assert message in str(exc.value)


def test_hf_files_enter_the_identity(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"weights")
    (hf / "README.md").write_text("not part of the model")
    first = nodes(graph_with(tmp_path, {"hf": "hf"}))["pretrain/decay"]
    assert first.deps == ("prepare/decay",)
    import hashlib

    assert first.payload["init"]["files"]["model.safetensors"] == hashlib.sha256(b"weights").hexdigest()
    (hf / "README.md").write_text("changed")
    assert nodes(graph_with(tmp_path, {"hf": "hf"}))["pretrain/decay"].identity == first.identity
    (hf / "model.safetensors").write_bytes(b"weightz")
    assert nodes(graph_with(tmp_path, {"hf": "hf"}))["pretrain/decay"].identity != first.identity
