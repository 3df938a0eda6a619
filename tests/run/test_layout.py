"""The run-directory contract (trinity/run/layout.py) as a real run of the micro graph's tokenizer leaves it:
run.json, spec.yaml, graph.json, and per node its outputs, attempt records, logs and heartbeat lease; and
node ids as paths: `RunDir.node` refuses any id that would lead outside RUN/nodes, so a graph.json
edited by hand cannot make a node write outside the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_runs import trinity
from trinity.errors import RunError
from trinity.execute.run import write_run
from trinity.run.graph import RunGraph
from trinity.run.layout import RunDir, read_json
from trinity.run.status import list_attempts
from trinity.spec.loading import load_experiment


def test_run_directory_contract(micro_graph: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = trinity("run", str(micro_graph), "--run-dir", str(run), "--nodes", "tokenizer")
    assert result.returncode == 0, result.stdout + result.stderr
    graph = read_json(run / "graph.json")
    ids = [n["id"] for n in graph["nodes"]]
    assert ids[0] == "tokenizer" and "pretrain/phase2" in ids
    node = graph["nodes"][0]
    assert node["flat_spec"]["model.moe.n_experts"] == 8
    assert (run / "spec.yaml").is_file() and (run / "run.json").is_file()
    tok = RunDir(run).node("tokenizer")
    assert (tok.outputs / "tokenizer.json").is_file()
    record = list_attempts(tok)[0]
    assert record.state == "SUCCEEDED" and record.exit_code == 0 and record.pid and record.end
    assert tok.log_file(1).is_file()
    lease = read_json(tok.lease)
    assert lease["attempt"] == 1


# -- node ids as paths: RunDir.node is the one place they become folders -----------------------------

TRAVERSING = ["../../victim", "../nodes2/x", "pretrain/../../../x", "/tmp/abs", "a//b", "a/./b", "a\x00b", ""]


@pytest.mark.parametrize("node_id", TRAVERSING, ids=repr)
def test_node_refuses_ids_that_are_not_plain_relative_paths(node_id: str, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="node id"):
        RunDir(tmp_path / "run").node(node_id)


def test_node_accepts_compiled_ids_and_keeps_them_under_nodes(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    for node_id in ("tokenizer", "pretrain/phase1", "eval/heldout@pretrain:phase1", "sft[muon.lr=0.01,rl=~0a1b]"):
        root = run.node(node_id).root
        assert root == tmp_path / "run" / "nodes" / node_id
        assert os.path.commonpath([root.resolve(), (tmp_path / "run" / "nodes").resolve()]) == str(
            (tmp_path / "run" / "nodes").resolve()
        )


def test_node_refuses_a_folder_that_a_symbolic_link_leads_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    run = RunDir(tmp_path / "run")
    (run.nodes / "pretrain").mkdir(parents=True)
    (run.nodes / "pretrain" / "phase1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunError, match="outside"):
        run.node("pretrain/phase1")
    (run.nodes / "inside").mkdir()
    (run.nodes / "pretrain" / "phase2").symlink_to(run.nodes / "inside", target_is_directory=True)
    assert run.node("pretrain/phase2").root == run.nodes / "pretrain" / "phase2"  # a link that stays inside is fine


def test_a_nodes_folder_linked_outside_the_run_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "nodes").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunError, match="outside"):
        RunDir(tmp_path / "run").node("tokenizer")


def test_paths_read_from_the_run_stay_inside_it(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert run.inside("branches/001.yaml") == tmp_path / "run" / "branches" / "001.yaml"
    for bad in ("../../etc/passwd", "/etc/passwd", "branches/../../x", ""):
        with pytest.raises(RunError):
            run.inside(bad)
    node = run.node("pretrain/phase1")
    assert node.inside("checkpoints/step-00000020") == node.root / "checkpoints" / "step-00000020"
    for bad in ("../phase2/checkpoints/step-00000020", "/tmp/x", "a/../../b"):
        with pytest.raises(RunError):
            node.inside(bad)
    with pytest.raises(RunError):
        run.superseded("pretrain/phase1", "../../x")
    with pytest.raises(RunError):
        run.superseded("../x", "0123456789ab-20260101-000000")
    assert (
        run.superseded("pretrain/phase1", "0123456789ab-1")
        == run.root / "superseded" / "pretrain/phase1@0123456789ab-1"
    )


def _files(root: Path, skip: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if skip not in p.parents and p != skip)


def _crafted_run(tmp_path: Path, micro_graph: Path) -> Path:
    """A run directory (written as `trinity run` writes it, nothing run) whose graph.json was edited by
    hand: the tokenizer node's id is `../../victim`."""
    run = tmp_path / "outer" / "run"
    write_run(load_experiment(micro_graph), run)
    graph = read_json(run / "graph.json")
    for node in graph["nodes"]:
        node["id"] = "../../victim" if node["id"] == "tokenizer" else node["id"]
        node["deps"] = ["../../victim" if d == "tokenizer" else d for d in node["deps"]]
    (run / "graph.json").write_text(json.dumps(graph))
    return run


def test_a_crafted_node_id_in_graph_json_is_refused_and_nothing_is_written_outside(
    tmp_path: Path, micro_graph: Path
) -> None:
    run = _crafted_run(tmp_path, micro_graph)
    with pytest.raises(RunError, match=r"'\.\./\.\./victim' has a '\.\.' segment"):
        RunGraph.load(RunDir(run))
    before = _files(tmp_path, run)
    # The node process itself, as an executor starts it, and the commands that read graph.json.
    attempt = subprocess.run(
        [sys.executable, "-m", "trinity.execute.attempt", str(run), "../../victim", "--attempt", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert attempt.returncode != 0
    status = trinity("status", str(run))
    assert status.returncode == 2 and "../../victim" in status.stderr, status.stdout + status.stderr
    assert "Traceback" not in status.stderr
    assert _files(tmp_path, run) == before  # no victim folder, no status.json, attempts or logs outside
    assert not (tmp_path / "outer" / "victim").exists()


def test_a_crafted_spec_file_in_graph_json_is_not_read(tmp_path: Path, micro_graph: Path) -> None:
    run = tmp_path / "run"
    write_run(load_experiment(micro_graph), run)
    graph = read_json(run / "graph.json")
    graph["nodes"][0]["spec_file"] = "../secret.yaml"
    (tmp_path / "secret.yaml").write_text("name: secret\n")
    (run / "graph.json").write_text(json.dumps(graph))
    loaded = RunGraph.load(RunDir(run))
    with pytest.raises(RunError, match="is not a path inside"):
        loaded.spec(loaded.nodes["tokenizer"])
