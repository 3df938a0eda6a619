"""Exact resume: a pretraining node stopped by Ctrl-C then killed with SIGKILL at a random step, or left with
a torn newest checkpoint, continues bit for bit from its last committed checkpoint."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_runs import NODE, losses, run_until_step, trinity
from trinity.run.layout import RunDir, read_json
from trinity.run.status import NodeStatus, list_attempts
from trinity.store.catalog import open_catalog


@dataclass(frozen=True)
class Interrupted:
    """What each leg of the `interrupted` run left: `trinity run`'s exit code and output, and the node status."""

    run: Path
    ctrl_c: tuple[int, str]
    after_ctrl_c: NodeStatus
    kill_code: int
    after_kill: NodeStatus
    resumed: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def interrupted(prepared: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    """One run of the node interrupted twice (the Ctrl-C and the SIGKILL tests check one leg each, and the end of
    both): Ctrl-C at step 7; `trinity run` again, its node process killed with SIGKILL at a random step past the
    checkpoint at 20; `trinity resume` to the end."""
    graph, prepared_run = prepared
    run = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(prepared_run, run)
    node_dir = RunDir(run).node(NODE)

    proc = run_until_step(graph, run, 7)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the scheduler
    output, _ = proc.communicate(timeout=300)
    ctrl_c, after_ctrl_c = (proc.returncode, output), NodeStatus.read(node_dir)

    kill_at = random.Random(os.getpid()).randint(22, 50)  # past the first checkpoint (every 20 steps)
    proc = run_until_step(graph, run, kill_at)
    os.kill(read_json(node_dir.lease)["pid"], signal.SIGKILL)
    proc.wait(timeout=120)
    kill_code, after_kill = proc.returncode, NodeStatus.read(node_dir)

    resumed = trinity("resume", str(run), "--nodes", NODE)
    return Interrupted(run, ctrl_c, after_ctrl_c, kill_code, after_kill, resumed)


def test_sigkill_at_random_step_then_resume_is_bit_identical(
    interrupted: Interrupted, straight: dict[int, float]
) -> None:
    killed = interrupted.run
    node_dir = RunDir(killed).node(NODE)
    assert interrupted.kill_code == 1
    killed_step = interrupted.after_kill.progress["step"]
    assert interrupted.after_kill.state == "FAILED"

    resumed = interrupted.resumed
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["STOPPED", "FAILED", "SUCCEEDED"]  # the first: the Ctrl-C test's
    assert attempts[1].signal == signal.SIGKILL
    assert attempts[2].resumed_from_step is not None and 0 < attempts[2].resumed_from_step <= killed_step

    assert losses(killed) == straight  # every step once, bit for bit
    con = open_catalog(killed)
    dup = con.sql(f"select step, count(*) from steps where node = '{NODE}' group by step having count(*) > 1")
    assert dup.fetchall() == []
    history = dict(
        con.sql(
            f"select attempt, count(*) from steps_history where node = '{NODE}' group by attempt order by attempt"
        ).fetchall()
    )
    assert attempts[1].resumed_from_step is not None
    # the killed attempt's rows stay as history
    assert history[2] >= attempts[2].resumed_from_step - attempts[1].resumed_from_step
    recorded = con.sql(f"select attempt, state, signal from attempts where node = '{NODE}' order by attempt")
    assert recorded.fetchall()[1][1:] == ("FAILED", signal.SIGKILL)


@pytest.mark.slow  # end to end: the last steps of the node trained again
def test_marker_less_newest_checkpoint_is_skipped(
    straight_run: Path, straight: dict[int, float], tmp_path: Path
) -> None:
    """The newest checkpoint corrupted mid-write (no commit marker): resume uses the one before.

    A copy of the uninterrupted run (checkpoints every 20 steps and at the end, the last two kept)
    loses the marker of its final checkpoint, as if killed between the rename and the marker."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    node_dir = RunDir(run).node(NODE)
    *_, before, newest = sorted(p for p in node_dir.checkpoints.iterdir() if p.name.startswith("step-"))
    assert int(newest.name.split("-")[1]) == max(straight)
    (newest / "COMMITTED").unlink()
    status = NodeStatus.read(node_dir)
    status.state, status.message = "FAILED", "simulated crash"
    status.write(node_dir)
    shutil.rmtree(node_dir.outputs)

    before_step = int(before.name.split("-")[1])
    assert 0 < before_step < max(straight)
    assert f"resume from its checkpoint at step {before_step}" in trinity("explain", str(run), NODE).stdout
    resumed = trinity("resume", str(run), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert list_attempts(node_dir)[-1].resumed_from_step == before_step
    assert losses(run) == straight


@pytest.mark.slow  # end to end: the node trained and resumed (with the SIGKILL test, in the quick tier)
def test_ctrl_c_stops_at_a_checkpoint_and_resume_continues_exactly(
    interrupted: Interrupted, straight: dict[int, float]
) -> None:
    returncode, output = interrupted.ctrl_c
    assert returncode == 130, output
    assert "interrupted" in output
    status = interrupted.after_ctrl_c
    assert status.state == "FAILED"
    assert "stopped on request; last committed checkpoint at step" in status.message
    stopped_at = int(status.message.rsplit(" ", 1)[-1])
    assert 7 <= stopped_at < 59  # a checkpoint was committed where it stopped, not at a cadence multiple
    assert list_attempts(RunDir(interrupted.run).node(NODE))[1].resumed_from_step == stopped_at  # `trinity run`
    assert interrupted.resumed.returncode == 0, interrupted.resumed.stdout + interrupted.resumed.stderr
    assert losses(interrupted.run) == straight
