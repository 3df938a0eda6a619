"""Runs of the micro graph (tests/graphs/micro.yaml) as a user starts them: the CLI in a fresh process,
a node run in the background until a step, and the losses a run logged."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from trinity.run.layout import RunDir
from trinity.run.status import NodeStatus
from trinity.store.catalog import open_catalog

NODE = "pretrain/phase1"
"""The node the resume tests train, kill and resume (59 steps, a checkpoint every 20)."""


def trinity(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "trinity.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def sigint_as_ctrl_c() -> None:
    """preexec_fn for a `trinity run` that a test interrupts: SIGINT back to its default disposition.

    A test run started from a non-interactive shell's background job (`cmd &`) inherits SIGINT as
    ignored, and Python then never turns it into KeyboardInterrupt; a terminal's Ctrl-C does not.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_until_step(graph: Path, run: Path, step: int, timeout_s: float = 300) -> subprocess.Popen[str]:
    """`trinity run GRAPH --run-dir RUN --nodes NODE` in the background, returned once NODE reports `step`
    (a test then kills or interrupts it). SIGINT keeps its default disposition (see sigint_as_ctrl_c)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(run), "--nodes", NODE],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_ctrl_c,
    )
    node_dir = RunDir(run).node(NODE)
    deadline = time.monotonic() + timeout_s
    while NodeStatus.read(node_dir).progress.get("step", 0) < step:
        assert proc.poll() is None and time.monotonic() < deadline, f"the node ended before it reached step {step}"
        time.sleep(0.05)
    return proc


def losses(run: Path) -> dict[int, float]:
    """step -> loss of NODE's current telemetry."""
    con = open_catalog(run)
    return dict(con.sql(f"select step, loss from steps where node = '{NODE}' order by step").fetchall())
