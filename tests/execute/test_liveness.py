"""`trinity status`, `explain` and `resume` judge a RUNNING node by one rule (trinity.run.status:
lease_liveness): a dead node is shown dead with the reason, a damaged lease is a reason and not a crash,
and a node whose scheduler was killed is waited for, at most the grace period."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.cli_runs import trinity
from trinity.errors import RunError
from trinity.execute.commands import explain, status_report, wait_for_stopping
from trinity.execute.run import decide, write_run
from trinity.graph.compile import compile_graph
from trinity.run.layout import NodeDir, RunDir, atomic_write_json
from trinity.run.status import AttemptRecord, NodeStatus, process_start
from trinity.spec.loading import load_experiment

NODE = "tokenizer"


@pytest.fixture
def running(micro_graph: Path, tmp_path: Path) -> tuple[RunDir, NodeDir]:
    """A run of the micro graph whose tokenizer says RUNNING in attempt 1 (no process behind it yet)."""
    run, graph = write_run(load_experiment(micro_graph), tmp_path / "run")
    node_dir = run.node(NODE)
    identity = graph.nodes[NODE]["node"].identity
    AttemptRecord(attempt=1, executor="local", identity=identity).write(node_dir)
    NodeStatus(state="RUNNING", identity=identity, attempt=1, message="running attempt 1").write(node_dir)
    return run, node_dir


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process to stand for a node's (in a session of its own; killed after the test)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def lease(**fields: Any) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
        "period_s": 2,
        "attempt": 1,
        **fields,
    }


def gone_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


DEAD = {
    "dead pid": (lambda: lease(pid=gone_pid()), "is gone"),
    "old heartbeat": (lambda: lease(host="elsewhere", time=time.time() - 412), "no heartbeat for 412 s"),
    "future lease on another host": (lambda: lease(host="elsewhere", time=time.time() + 3600), "in the future"),
    "lease of another attempt": (lambda: lease(attempt=7), "the lease is attempt 7's, not attempt 1's"),
}


@pytest.mark.parametrize("case", DEAD)
def test_status_and_explain_call_a_node_dead_by_one_rule(running: tuple[RunDir, NodeDir], case: str) -> None:
    run, node_dir = running
    make, why = DEAD[case]
    atomic_write_json(node_dir.lease, make())
    [node] = [n for n in status_report(run.root)["nodes"] if n["id"] == NODE]
    assert node["state"] == "RUNNING"  # status.json's state machine is untouched
    assert node["live"] is False and why in node["why"], node
    decision = explain(run.root, NODE)
    assert decision.action == "run" and decision.reason.startswith("died in attempt 1 (") and why in decision.reason


def test_a_truncated_lease_is_a_dead_node_for_status_and_explain_not_a_crash(running: tuple[RunDir, NodeDir]) -> None:
    run, node_dir = running
    node_dir.lease.write_text(json.dumps(lease())[:25])
    shown = trinity("status", str(run.root))
    assert shown.returncode == 0, shown.stderr
    assert f"dead: {NODE}; continue with `trinity resume" in shown.stdout
    row = next(line for line in shown.stdout.splitlines() if NODE in line and "RUNNING" in line)
    assert "RUNNING (dead:" in row, shown.stdout  # the state column says so
    report = json.loads(trinity("status", str(run.root), "--json").stdout)
    [node] = [n for n in report["nodes"] if n["id"] == NODE]
    assert node["live"] is False and node["why"].startswith("damaged lease.json (Invalid JSON")
    explained = trinity("explain", str(run.root), NODE)
    assert explained.returncode == 0, explained.stderr
    assert f"{NODE} will run: died in attempt 1 (damaged lease.json" in explained.stdout


def test_a_live_node_is_busy(running: tuple[RunDir, NodeDir], sleeper: subprocess.Popen[bytes]) -> None:
    run, node_dir = running
    atomic_write_json(node_dir.lease, lease(pid=sleeper.pid, start=process_start(sleeper.pid)))
    [node] = [n for n in status_report(run.root)["nodes"] if n["id"] == NODE]
    assert (node["live"], node["stopping"]) == (True, False)
    assert explain(run.root, NODE).action == "busy"


def orphan(node_dir: NodeDir, node: subprocess.Popen[bytes]) -> None:
    """The node's lease: it runs (`node`), and watches a scheduler that is gone."""
    scheduler = {"pid": gone_pid(), "start": 1}
    atomic_write_json(node_dir.lease, lease(pid=node.pid, start=process_start(node.pid), scheduler=scheduler))


def test_resume_waits_for_a_node_whose_scheduler_is_gone(
    running: tuple[RunDir, NodeDir], sleeper: subprocess.Popen[bytes]
) -> None:
    run, node_dir = running
    orphan(node_dir, sleeper)
    dag = compile_graph(load_experiment(run.spec_yaml))
    decisions = decide(run, dag)
    assert decisions[NODE].action == "stopping" and "its scheduler" in decisions[NODE].reason

    def stop() -> None:  # what the node does once it noticed: commit, say so, exit
        time.sleep(1)
        status = NodeStatus.read(node_dir)
        status.state, status.message = "FAILED", "stopped: its scheduler is gone"
        status.write(node_dir)
        os.killpg(sleeper.pid, signal.SIGKILL)

    stopper = threading.Thread(target=stop)
    stopper.start()
    console = Console(file=io.StringIO(), width=200)
    try:
        after = wait_for_stopping(run, dag, decisions, console, grace_s=60)
    finally:
        stopper.join()
    assert after[NODE].action == "run" and after[NODE].reason.startswith("FAILED in attempt 1: stopped")
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert f"waiting (at most 60 s) for {NODE} to stop at a checkpoint" in printed


def test_resume_refuses_a_node_that_does_not_stop_in_time_naming_its_pid(
    running: tuple[RunDir, NodeDir], sleeper: subprocess.Popen[bytes]
) -> None:
    run, node_dir = running
    orphan(node_dir, sleeper)
    dag = compile_graph(load_experiment(run.spec_yaml))
    with pytest.raises(RunError, match=f"pid {sleeper.pid} .* did not stop within 1 s"):
        wait_for_stopping(run, dag, decide(run, dag), Console(file=io.StringIO()), grace_s=1)
    [node] = [n for n in status_report(run.root)["nodes"] if n["id"] == NODE]
    assert node["live"] and node["stopping"]
