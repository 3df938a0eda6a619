"""`trinity watch RUN` as a user runs it: under a pseudo-terminal against a live run until the run ends by
itself, `--once` on a finished run, and the exit status of a run whose node failed or died."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_runs import NODE, trinity
from trinity.cli_watch import sparkline
from trinity.run.layout import RunDir, atomic_write_json, read_json
from trinity.run.status import NodeStatus

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _states(run: Path) -> dict[str, str]:
    graph = read_json(run / "graph.json")
    return {n["id"]: NodeStatus.read(RunDir(run).node(n["id"])).state for n in graph["nodes"]}


def test_sparkline_spans_lowest_to_highest() -> None:
    assert sparkline([3.0, 1.0, 2.0, float("nan")]) == "█▁▅"
    assert sparkline([]) == "" and sparkline([5.0, 5.0]) == "▁▁"


def test_watch_once_on_a_finished_run_prints_plain_counts(prepared: tuple[Path, Path]) -> None:
    _, run = prepared
    states = _states(run)
    done = sum(s == "SUCCEEDED" for s in states.values())
    result = trinity("watch", str(run), "--once")
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout  # captured output: text, no terminal codes
    pending = len(states) - done
    assert f"{done} done, 0 running, {pending} pending, 0 failed" in result.stdout
    assert "no scheduler" in result.stdout


def test_watch_exits_1_naming_a_failed_and_a_dead_node(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    status = read_json(RunDir(run).node("tokenizer").status)
    atomic_write_json(RunDir(run).node("tokenizer").status, status | {"state": "FAILED", "message": "boom"})
    dead = RunDir(run).node("prepare/phase1")
    atomic_write_json(dead.status, read_json(dead.status) | {"state": "RUNNING"})
    dead.lease.unlink(missing_ok=True)  # RUNNING without a lease: its process died without saying so
    result = trinity("watch", str(run), "--interval", "0.2")
    assert result.returncode == 1, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    assert "did not succeed: tokenizer, prepare/phase1" in text and "dead: no heartbeat lease" in text


@pytest.mark.slow
def test_watch_follows_a_live_run_until_it_ends(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    training = subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(run), "--nodes", NODE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node_dir = RunDir(run).node(NODE)
    deadline = time.monotonic() + 300
    while NodeStatus.read(node_dir).state != "RUNNING":
        assert training.poll() is None and time.monotonic() < deadline, "the node never started"
        time.sleep(0.1)
    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm"}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", "watch", str(run), "--interval", "0.5"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    seen = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the terminal's other end closed: the watch exited
                    break
                if not chunk:
                    break
                seen += chunk
            elif watcher.poll() is not None:
                break
        code = watcher.wait(timeout=30)
    finally:
        os.close(primary)
        for proc in (watcher, training):
            if proc.poll() is None:
                proc.kill()
    assert training.wait(timeout=60) == 0
    text = ANSI.sub("", seen.decode(errors="replace"))
    assert code == 0, text[-2000:]
    assert "\x1b[" in seen.decode(errors="replace")  # a terminal: rich redraws the frame in place
    steps = [int(s) for s in re.findall(rf"{re.escape(NODE)} #1\s*│\s*(\d+)/59", text)]
    assert len(set(steps)) >= 2 and steps == sorted(steps), text[-2000:]  # refreshed while the node trained
    assert "1 running" in text and "0 running" in text
    assert "the run has ended: 3 node(s) done" in text
