"""A run directory remembers how it was made, and `trinity run` says why each node runs or is reused
(trinity/execute/run.py: Origin, check_origin; trinity/execute/commands.py: run_loaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli_runs import trinity
from tests.conftest import compose
from trinity.run.layout import RunDir, read_json
from trinity.run.status import list_attempts

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
