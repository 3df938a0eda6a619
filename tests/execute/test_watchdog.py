"""Restarts the scheduler makes: an attempt that exits EXIT_RESTART is started again at once, and a node whose
optimizer steps stop advancing (a hung rank) is seen STALLED, recorded as a `stall` event and, with
`execution.watchdog.on_stall: restart`, killed and resumed from its last committed checkpoint with the
losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import networkx as nx
import pytest

from tests.cli_runs import NODE, losses, trinity
from tests.conftest import compose
from tests.execute.conftest import TWO_RANKS, require_slurm_cluster
from trinity.execute.attempt import EXIT_RESTART
from trinity.execute.commands import status_report
from trinity.execute.executor import Finished
from trinity.execute.scheduler import _loop, _StopSignals
from trinity.run.layout import RunDir
from trinity.run.status import AttemptRecord, NodeStatus, lease_liveness, list_attempts
from trinity.spec.execution import ALLOW_INJECT_ENV
from trinity.store.catalog import open_catalog


@dataclass
class _ScriptedHandle:
    """An attempt that ends as scripted: attempt 1 asks for a restart, later ones succeed."""

    node_id: str
    attempt: int
    run: RunDir

    def poll(self) -> Finished | None:
        node_dir = self.run.node(self.node_id)
        if self.attempt == 1:
            return Finished(EXIT_RESTART, None, "rolled back after a loss spike")
        AttemptRecord.read(node_dir, self.attempt).finish(node_dir, "SUCCEEDED", 0, None, "")
        NodeStatus(state="SUCCEEDED", attempt=self.attempt).write(node_dir)
        return Finished(0, None)

    def stop(self) -> None:
        pass

    def kill(self) -> None:
        pass


@dataclass
class _ScriptedExecutor:
    run: RunDir
    name: str = "local"

    def check(self, node_ids: list[str]) -> None:
        pass

    def slots(self, node_id: str) -> int:
        return 1

    def launch(self, node_id: str, attempt: int) -> _ScriptedHandle:
        return _ScriptedHandle(node_id, attempt, self.run)


def test_an_attempt_that_exits_restart_is_started_again_and_nothing_downstream_fails(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    graph = nx.DiGraph()
    for node_id in ("train", "after"):
        graph.add_node(node_id, node=SimpleNamespace(id=node_id, identity=f"id-{node_id}"))
        run.node(node_id).root.mkdir(parents=True)
    graph.add_edge("train", "after")
    pending: list[str] = ["train", "after"]
    with _StopSignals() as signals:
        _loop(run, graph, _ScriptedExecutor(run), 1, lambda: None, pending, {}, signals)
    attempts = list_attempts(run.node("train"))
    assert [(a.state, a.exit_code) for a in attempts] == [("RESTART", EXIT_RESTART), ("SUCCEEDED", 0)]
    assert attempts[0].message == "rolled back after a loss spike"
    assert NodeStatus.read(run.node("train")).state == "SUCCEEDED"
    assert NodeStatus.read(run.node("after")).state == "SUCCEEDED"  # ran after it: no DEP_FAILED


# -- a hung rank, end to end through `trinity run` ------------------------------------------------------

HANG_AT = 13
"""The optimizer step the injected hang comes before: attempt 1 commits step 10 and completes step 12."""


def hung_graph(tmp_path: Path, on_stall: str = "restart", hang_s: float = 300, **sections: Any) -> Path:
    """The micro graph whose NODE hangs (attempt 1 only) before step HANG_AT; a stall after 8 s without a step."""
    execution = {
        "checkpoint": {"every": 10},
        "heartbeat_s": 1,
        "watchdog": {"stall_after_s": 8, "first_step_s": 300, "on_stall": on_stall},
        "inject": {"hang_at_step": HANG_AT, "hang_s": hang_s, **sections.pop("inject", {})},
    }
    return compose(tmp_path / "hung.yaml", "micro.yaml", execution=execution, **sections)


def stall_events(run: Path) -> list[dict[str, Any]]:
    con = open_catalog(run)
    rows = con.sql(
        f"select attempt, step, message, data from events where node = '{NODE}' and kind = 'stall' order by time"
    ).fetchall()
    return [{"attempt": a, "step": s, "message": m, **json.loads(d)} for a, s, m, d in rows]


@pytest.fixture
def allow_inject(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_INJECT_ENV, "1")


@pytest.mark.slow
def test_a_two_rank_node_whose_rank_1_hangs_is_restarted_with_exact_losses(
    prepared: tuple[Path, Path], two_rank_run: Path, tmp_path: Path, allow_inject: None
) -> None:
    """The acceptance case: rank 1 sleeps, rank 0 waits in the next collective (its heartbeat thread still
    beats), the scheduler sees the steps stop, kills torchrun's whole tree and a new attempt resumes."""
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    graph = hung_graph(tmp_path, parallel=TWO_RANKS, inject={"hang_rank": 1})
    result = trinity("run", str(graph), "--run-dir", str(run), "--nodes", NODE)
    assert result.returncode == 0, result.stdout + result.stderr
    attempts = list_attempts(RunDir(run).node(NODE))
    assert [a.state for a in attempts] == ["STALLED", "SUCCEEDED"]
    assert attempts[1].resumed_from_step == 10
    [event] = stall_events(run)
    assert (event["attempt"], event["last_step"], event["action"]) == (1, HANG_AT - 1, "restart")
    assert losses(run) == losses(two_rank_run)  # the uninterrupted 2-rank run's losses, bit for bit


@pytest.mark.slow
def test_with_warn_status_shows_the_stall_and_the_node_is_left_running(
    prepared: tuple[Path, Path], tmp_path: Path, allow_inject: None
) -> None:
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    graph = hung_graph(tmp_path, on_stall="warn", inject={"hang_at_step": 3})
    proc = subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(run), "--nodes", NODE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node_dir = RunDir(run).node(NODE)
    try:
        deadline, stalled = time.monotonic() + 300, None
        while stalled is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the node never showed as stalled"
            time.sleep(0.5)
            [node] = [n for n in status_report(run)["nodes"] if n["id"] == NODE]  # what `status --json` prints
            stalled = node["stalled"]
        report = json.loads(trinity("status", str(run), "--json").stdout)
        [node] = [n for n in report["nodes"] if n["id"] == NODE]
        stalled = node["stalled"]
        assert node["state"] == "RUNNING" and node["live"] is True
        assert stalled.startswith("no step for ") and "since step 2 (allowed 8 s)" in stalled
        assert "STALLED: no step for" in " ".join(trinity("status", str(run)).stdout.split())
        while not stall_events(run):  # the scheduler writes it on the poll that sees the stall
            assert time.monotonic() < deadline
            time.sleep(0.5)
        [event] = stall_events(run)
        assert (event["attempt"], event["step"], event["action"]) == (1, 2, "warn")
        time.sleep(2)  # a few scheduler polls later: warned only, the same attempt still runs
        assert [a.state for a in list_attempts(node_dir)] == ["RUNNING"]
        assert lease_liveness(node_dir, 1).live
    finally:
        lease = lease_liveness(node_dir).lease
        if lease is not None and proc.poll() is None:
            os.kill(lease.pid, signal.SIGKILL)  # it sleeps through a stop request: end the test at once
        proc.wait(timeout=120)


@pytest.mark.slow
@pytest.mark.slurm
def test_on_slurm_a_hung_node_is_requeued_and_resumes_with_exact_losses(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path, allow_inject: None
) -> None:
    """The job's supervisor (task 0) sees the stall, kills the node process and requeues its own job."""
    require_slurm_cluster()
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    slurm = ["--executor", "slurm", "--set", "execution.slurm.cpus_per_task=1"]
    result = trinity("run", str(hung_graph(tmp_path)), "--run-dir", str(run), "--nodes", NODE, *slurm)
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = list_attempts(RunDir(run).node(NODE))
    assert (first.state, second.state) == ("STALLED", "SUCCEEDED")
    assert first.job_id == second.job_id  # the same job, requeued
    assert second.resumed_from_step == 10
    [event] = stall_events(run)
    assert (event["attempt"], event["last_step"], event["action"]) == (1, HANG_AT - 1, "restart")
    assert losses(run) == straight
