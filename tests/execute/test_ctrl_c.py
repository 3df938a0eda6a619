"""Ctrl-C as a person at the terminal meets it: the first one says at once which nodes are stopping and
what a second one does; a second one, while a node is still on its way to a checkpoint, kills it, names it
and where its resume continues, and its attempt ends KILLED with the signal (not RUNNING, not "stopped").

The node is frozen (SIGSTOP) before the first Ctrl-C: a node deep in a long step, which cannot reach its
checkpoint for a while. That makes "said at once" and "still training at the second Ctrl-C" certain, not
a race with a 0.1 s step. (A first Ctrl-C that the node obeys: tests/execute/test_resume.py.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.cli_runs import NODE, run_until_step
from trinity.nodes.checkpoints import last_committed_step
from trinity.run.layout import RunDir
from trinity.run.status import NodeStatus, lease_liveness, list_attempts, process_alive
from trinity.store.catalog import open_catalog

SAYS_WITHIN_S = 10.0
"""The first Ctrl-C's line appears within this (the scheduler polls every 0.5 s; the node takes no part)."""


class Lines:
    """A process's stdout, read line by line in a thread, so a test can wait for one line with a timeout."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} within {timeout_s:.0f} s; output:\n{''.join(self.lines)}")

    def rest(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


@pytest.mark.slow  # end to end: `trinity run` of the micro node, interrupted twice
def test_ctrl_c_says_at_once_what_stops_and_a_second_one_kills_the_node_and_names_it(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    node_dir = RunDir(run).node(NODE)
    proc = run_until_step(graph, run, 22)  # past the checkpoint at step 20 (execution.checkpoint.every)
    lease = lease_liveness(node_dir).lease
    assert lease is not None
    pid = lease.pid
    out = Lines(proc.stdout)
    try:
        os.kill(pid, signal.SIGSTOP)  # deep in a long step: it cannot reach its checkpoint until continued
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = out.wait_for("Ctrl-C: stopping", SAYS_WITHIN_S)
        said_after_s = time.monotonic() - t0
        assert f"stopping 1 node(s) at their next checkpoint ({NODE}); Ctrl-C again to kill them at once" in line
        assert process_alive(pid) and NodeStatus.read(node_dir).state == "RUNNING"  # said before it stopped
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        output = " ".join(out.rest().split())  # as one line: the CLI wraps long messages
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 130, output
    assert not process_alive(pid)  # killed, not left training
    assert f"Ctrl-C again: killing 1 node(s) now ({NODE})" in output
    step = last_committed_step(node_dir)
    assert step == 20  # the node was frozen past step 22: its newest committed checkpoint is the cadence's
    assert (
        f"interrupted (SIGINT): 1 node(s) were killed by a second Ctrl-C before their checkpoint "
        f"(resume: {NODE} from step 20)" in output
    ), output
    assert "were stopped at a checkpoint" not in output  # no claim that it stopped
    [attempt] = list_attempts(node_dir)
    assert (attempt.state, attempt.signal, attempt.end is not None) == ("KILLED", signal.SIGKILL, True)
    status = NodeStatus.read(node_dir)
    assert status.state == "FAILED" and status.message.endswith("resume continues from its checkpoint at step 20")
    killed = open_catalog(run).sql(f"select attempt, state, signal from attempts where node = '{NODE}'").fetchall()
    assert killed == [(1, "KILLED", signal.SIGKILL)]  # "which attempt was killed" answered in SQL
    print(f"first Ctrl-C's line after {said_after_s:.2f} s")
