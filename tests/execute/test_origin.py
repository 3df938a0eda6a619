"""A run directory remembers how it was made, and `trinity run` says why each node runs or is reused
(trinity/execute/run.py: Origin, check_origin; trinity/execute/commands.py: run_loaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.cli_runs import NODE, trinity
from tests.conftest import ROOT, compose
from tests.execute.test_liveness import gone_pid, lease, running  # noqa: F401 (a fixture)
from trinity.errors import RunError
from trinity.execute.run import write_run
from trinity.run.layout import NodeDir, RunDir, atomic_write_json, read_json
from trinity.run.status import AttemptRecord, NodeStatus, list_attempts
from trinity.spec.loading import load_experiment
from trinity.store.catalog import open_catalog

PREPARE = "prepare/phase1"
SHORT = "data.phases.phase1.tokens=6000"
"""A --set that changes prepare/phase1's identity (and nothing upstream of it)."""


@pytest.mark.slow
def test_run_remembers_its_graph_and_sets_and_refuses_to_supersede_silently(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    made = read_json(RunDir(run).run_json)
    assert made["graph_file"] == str(graph.resolve()) and made["sets"] == [] and len(made["spec_sha256"]) == 64

    # A --set added on the same graph: the edit is intended; each node says why it runs or is reused.
    first = trinity("run", str(graph), "--run-dir", str(run), "--nodes", PREPARE, "--set", SHORT)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "  tokenizer: reused: SUCCEEDED in attempt 1 with identity" in first.stdout
    assert f"  {PREPARE}: runs: its identity changed (changed: tokens)" in first.stdout
    meta = read_json(RunDir(run).run_json)
    assert meta["sets"] == [SHORT] and meta["spec_sha256"] != made["spec_sha256"]
    assert [o["sets"] for o in meta["origins"]] == [[], [SHORT]]
    assert len(list(RunDir(run).root.glob("superseded/prepare/phase1@*"))) == 1

    # The same command without the remembered --set would re-run the node: refused, saying what to add.
    forgot = trinity("run", str(graph), "--run-dir", str(run), "--nodes", PREPARE)
    assert forgot.returncode == 2, forgot.stdout + forgot.stderr
    said = " ".join(forgot.stderr.split())
    assert f"was made with --set {SHORT}, not given this time" in said and PREPARE in said and "--force" in said
    assert read_json(RunDir(run).run_json)["sets"] == [SHORT]  # nothing written

    # Another graph file into the run: refused, naming what it would supersede; nothing moves.
    other = compose(tmp_path / "other.yaml", "micro.yaml", seed=1)
    moved = trinity("run", str(other), "--run-dir", str(run), "--nodes", PREPARE, "--set", SHORT)
    assert moved.returncode == 2, moved.stdout + moved.stderr
    said = " ".join(moved.stderr.split())
    assert f"was made from {graph.resolve()}; running {other.resolve()} into it would supersede" in said
    assert "tokenizer" in said and "--force" in said
    assert read_json(RunDir(run).run_json)["graph_file"] == str(graph.resolve())
    assert len(list_attempts(RunDir(run).node("tokenizer"))) == 1


@pytest.mark.slow
def test_a_graph_that_drops_a_node_moves_it_aside_and_sql_keeps_its_rows(straight_run: Path, tmp_path: Path) -> None:
    """pretrain/phase1 (59 steps trained) is not in a graph whose first phase is renamed: `explain --graph`
    says so before anything moves; the run needs --force (another graph file), moves the folder to
    RUN/superseded/, and its rows stay in steps_history (not in steps)."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    phases = yaml.safe_load((ROOT / "specs" / "data" / "micro.yaml").read_text())["phases"]
    renamed = compose(tmp_path / "renamed.yaml", "micro.yaml", data={"phases": [{**phases[0], "name": "first"}]})

    gone = trinity("explain", str(run), NODE, "--graph", str(renamed))
    assert gone.returncode == 2 and "has no node 'pretrain/phase1'" in gone.stderr, gone.stdout + gone.stderr
    assert "would move its folder to" in " ".join(gone.stderr.split())
    new = trinity("explain", str(run), "pretrain/first", "--graph", str(renamed))
    assert new.returncode == 0 and new.stdout.startswith(f"pretrain/first will run by `trinity run {renamed}"), (
        new.stdout
    )
    kept = trinity("explain", str(run), "tokenizer", "--graph", str(renamed))
    assert "tokenizer will be reused by" in kept.stdout, kept.stdout + kept.stderr

    refused = trinity("run", str(renamed), "--run-dir", str(run), "--nodes", "tokenizer")
    assert refused.returncode == 2 and "would supersede" in refused.stderr and NODE in refused.stderr, refused.stderr
    assert RunDir(run).node(NODE).root.is_dir()  # nothing moved
    forced = trinity("run", str(renamed), "--run-dir", str(run), "--nodes", "tokenizer", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert not RunDir(run).node(NODE).root.exists()
    (aside,) = RunDir(run).root.glob("superseded/pretrain/phase1@dropped-*")
    con = open_catalog(run)
    history = con.sql(
        f"select count(*), max(step), any_value(superseded_folder) from steps_history where node = '{NODE}'"
    )
    assert history.fetchall() == [(59, 59, str(aside.resolve()))]
    assert con.sql(f"select count(*) from steps where node = '{NODE}'").fetchall() == [(0,)]


@pytest.mark.slow
def test_explain_judges_an_edited_graph_with_its_sets(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    plain = trinity("explain", str(run), PREPARE, "--graph", str(graph))
    assert plain.returncode == 0 and f"{PREPARE} will be reused by" in plain.stdout, plain.stdout + plain.stderr
    edited = trinity("explain", str(run), PREPARE, "--graph", str(graph), "--set", SHORT)
    assert edited.returncode == 0 and "will run by" in edited.stdout and "changed: tokens" in edited.stdout, (
        edited.stdout
    )
    stored = trinity("explain", str(run), PREPARE)  # the stored spec, as `trinity resume` would
    assert f"{PREPARE} will be reused: " in stored.stdout, stored.stdout
    lone = trinity("explain", str(run), PREPARE, "--set", SHORT)
    assert lone.returncode == 2 and "--set needs --graph" in lone.stderr, lone.stderr


def test_a_dropped_node_that_still_runs_keeps_its_folder_until_it_stops(
    running: tuple[RunDir, NodeDir],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A graph that renames phase 2 drops pretrain/phase2; while that node's heartbeat is live nothing is
    written or moved (its process writes in its folder), once its process is gone the folder moves aside."""
    run, _ = running
    node_dir = run.node("pretrain/phase2")
    AttemptRecord(attempt=1, executor="local", identity="a" * 64).write(node_dir)
    NodeStatus(state="RUNNING", identity="a" * 64, attempt=1, message="running attempt 1").write(node_dir)
    atomic_write_json(node_dir.lease, lease())  # this test's own process: live
    phases = yaml.safe_load((ROOT / "specs" / "data" / "micro.yaml").read_text())["phases"]
    renamed = compose(
        tmp_path / "renamed.yaml", "micro.yaml", data={"phases": [phases[0], {**phases[1], "name": "two"}]}
    )
    before = run.run_json.read_bytes(), run.graph_json.read_bytes()
    with pytest.raises(RunError, match=r"pretrain/phase2 is not in the new graph but still runs"):
        write_run(load_experiment(renamed), run.root)
    assert (run.run_json.read_bytes(), run.graph_json.read_bytes()) == before and node_dir.root.is_dir()
    atomic_write_json(node_dir.lease, lease(pid=gone_pid()))  # its process is gone
    write_run(load_experiment(renamed), run.root)
    assert not node_dir.root.exists() and len(list(run.root.glob("superseded/pretrain/phase2@dropped-*"))) == 1
