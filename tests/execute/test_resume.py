"""Exact resume: a pretraining node killed with SIGKILL at a random step, stopped by Ctrl-C, or left with a
torn newest checkpoint continues bit for bit from its last committed checkpoint."""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import pytest

from tests.cli_runs import NODE, losses, run_until_step, trinity
from trinity.run.layout import RunDir, read_json
from trinity.run.status import NodeStatus, list_attempts
from trinity.store.catalog import open_catalog


def test_sigkill_at_random_step_then_resume_is_bit_identical(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path
) -> None:
    graph, prepared_run = prepared
    killed = tmp_path / "killed"
    shutil.copytree(prepared_run, killed)
    expected = straight

    kill_at = random.Random(os.getpid()).randint(22, 50)  # past the first checkpoint (every 20 steps)
    proc = run_until_step(graph, killed, kill_at)
    node_dir = RunDir(killed).node(NODE)
    os.kill(read_json(node_dir.lease)["pid"], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == 1
    killed_step = NodeStatus.read(node_dir).progress["step"]
    assert NodeStatus.read(node_dir).state == "FAILED"

    resumed = trinity("resume", str(killed), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["FAILED", "SUCCEEDED"]
    assert attempts[0].signal == signal.SIGKILL
    assert attempts[1].resumed_from_step is not None and 0 < attempts[1].resumed_from_step <= killed_step

    assert losses(killed) == expected  # every step once, bit for bit
    con = open_catalog(killed)
    dup = con.sql(f"select step, count(*) from steps where node = '{NODE}' group by step having count(*) > 1")
    assert dup.fetchall() == []
    history = con.sql(
        f"select attempt, count(*) from steps_history where node = '{NODE}' group by attempt order by attempt"
    ).fetchall()
    first_attempt_rows = history[0][1]
    assert first_attempt_rows >= attempts[1].resumed_from_step  # the killed attempt's rows stay as history
    recorded = con.sql(f"select attempt, state, signal from attempts where node = '{NODE}' order by attempt")
    assert recorded.fetchall()[0][1:] == ("FAILED", signal.SIGKILL)


@pytest.mark.slow  # end to end: the node trained twice
def test_marker_less_newest_checkpoint_is_skipped(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """The newest checkpoint corrupted mid-write (no commit marker): resume uses the one before."""
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    result = trinity(
        "run", str(graph), "--run-dir", str(run), "--nodes", NODE, "--set", "execution.checkpoint_every=10"
    )
    assert result.returncode == 0
    expected = losses(run)
    node_dir = RunDir(run).node(NODE)
    newest = sorted(p for p in node_dir.checkpoints.iterdir() if p.name.startswith("step-"))[-1]
    (newest / "COMMITTED").unlink()  # as if killed between the rename and the marker
    status = NodeStatus.read(node_dir)
    status.state, status.message = "FAILED", "simulated crash"
    status.write(node_dir)
    shutil.rmtree(node_dir.outputs)

    assert "resume from its checkpoint at step 50" in trinity("explain", str(run), NODE).stdout
    resumed = trinity("resume", str(run), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert list_attempts(node_dir)[-1].resumed_from_step == 50
    assert losses(run) == expected


@pytest.mark.slow  # end to end: the node trained and resumed (the SIGKILL case stays in the quick tier)
def test_ctrl_c_stops_at_a_checkpoint_and_resume_continues_exactly(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path
) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    proc = run_until_step(graph, run, 7)
    node_dir = RunDir(run).node(NODE)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the scheduler
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output
    assert "interrupted" in output
    status = NodeStatus.read(node_dir)
    assert status.state == "FAILED"
    assert "stopped on request; last committed checkpoint at step" in status.message
    stopped_at = int(status.message.rsplit(" ", 1)[-1])
    assert 7 <= stopped_at < 59  # a checkpoint was committed where it stopped, not at a cadence multiple
    resumed = trinity("resume", str(run), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert list_attempts(node_dir)[-1].resumed_from_step == stopped_at
    assert losses(run) == straight
