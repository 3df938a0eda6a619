"""No node outlives its scheduler: `trinity run` stopped by SIGTERM or SIGHUP stops its nodes at a checkpoint
(exit 128 + the signal), one killed with SIGKILL (its whole process group) leaves a node that stops at a
checkpoint by itself, and `trinity resume` right after that waits for it and finishes with the losses of an
uninterrupted run. `--detach` is the one way to leave a node running on its own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_runs import NODE, losses, trinity
from tests.conftest import compose
from tests.execute.conftest import descendants
from trinity.nodes.checkpoints import last_committed_step
from trinity.run.layout import NodeDir, RunDir
from trinity.run.ranks import read_rank_ends
from trinity.run.status import AttemptRecord, NodeStatus, lease_liveness, list_attempts, process_alive

HALF_BATCH = {"start_tokens": 0, "sequences": 4}
STOPS_WITHIN_S = 60.0
"""A stopping node finishes its step and commits a checkpoint well within this (a step is ~0.1 s here)."""


class Scheduler:
    """`trinity run` of NODE in its own session (its process group is the scheduler alone: the nodes run in
    sessions of their own); everything it started is killed when the test ends."""

    def __init__(self, graph: Path, run: Path, *extra: str) -> None:
        self.node_dir = RunDir(run).node(NODE)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(run), "--nodes", NODE, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # A user's terminal delivers SIGHUP; a test session started under `nohup` would pass its
            # SIG_IGN on, and an ignored SIGHUP is (rightly) left ignored by the scheduler.
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
        )
        self.node_pids: set[int] = set()

    def until_step(self, step: int, timeout_s: float = 300) -> int:
        """Wait until NODE reports `step`; returns the pid of its process (from the lease)."""
        deadline = time.monotonic() + timeout_s
        while NodeStatus.read(self.node_dir).progress.get("step", 0) < step:
            assert self.proc.poll() is None and time.monotonic() < deadline, f"the node ended before step {step}"
            time.sleep(0.05)
        live = lease_liveness(self.node_dir)
        assert live.live and live.lease is not None, live.why
        self.node_pids.add(live.lease.pid)
        return live.lease.pid

    def close(self) -> None:
        for pid in self.node_pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # a node process leads its own session and group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate(timeout=60)


@pytest.fixture
def scheduler(prepared: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[Path, Path, list[Scheduler]]]:
    """(graph, a copy of the prepared run, schedulers to start): the schedulers and their nodes are killed after."""
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    started: list[Scheduler] = []
    try:
        yield graph, run, started
    finally:
        for s in started:
            s.close()


def wait_gone(pid: int, timeout_s: float = STOPS_WITHIN_S) -> float:
    """Seconds until process `pid` is gone (exited; a zombie nobody collected counts as gone)."""
    t0 = time.monotonic()
    while process_alive(pid):
        assert time.monotonic() - t0 < timeout_s, f"node process {pid} still runs {timeout_s:.0f} s later"
        time.sleep(0.05)
    return time.monotonic() - t0


def stopped_at(node_dir: NodeDir, reason: str) -> int:
    """The step of the checkpoint the node says it stopped at (it is committed); asserts the reason."""
    status = NodeStatus.read(node_dir)
    assert status.state == "FAILED" and status.message.startswith(reason), status.message
    assert "; last committed checkpoint at step " in status.message
    step = int(status.message.rsplit(" ", 1)[-1])
    assert last_committed_step(node_dir) == step
    [attempt] = list_attempts(node_dir)
    assert attempt.state == "STOPPED" and attempt.end is not None
    return step


@dataclass(frozen=True)
class Leg:
    """One interruption of the `stopped_twice` run: the scheduler, the node's pid, whether that process was
    still alive right after, and the node's attempts and last committed checkpoint at that moment."""

    scheduler: Scheduler
    pid: int
    alive_after: bool
    attempts: list[AttemptRecord]
    committed: int | None
    status: NodeStatus


@dataclass(frozen=True)
class StoppedTwice:
    run: Path
    sigterm: Leg
    sigterm_out: str
    group_killed: Leg
    resumed: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def stopped_twice(prepared: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoppedTwice]:
    """One run of the node stopped twice, then resumed (the SIGTERM and the group-kill tests check one stop
    each, and the end of both): SIGTERM to `trinity run` at step 5; `trinity run` again, its process group
    killed with SIGKILL 5 steps later; `trinity resume` at once, while the node may still be stopping."""
    graph, prepared_run = prepared
    run = tmp_path_factory.mktemp("stopped") / "run"
    shutil.copytree(prepared_run, run)
    started: list[Scheduler] = []
    try:
        s = Scheduler(graph, run)
        started.append(s)
        pid = s.until_step(5)
        s.proc.send_signal(signal.SIGTERM)
        out, _ = s.proc.communicate(timeout=STOPS_WITHIN_S)
        node_dir = s.node_dir
        sigterm = Leg(
            s,
            pid,
            process_alive(pid),
            list_attempts(node_dir),
            last_committed_step(node_dir),
            NodeStatus.read(node_dir),
        )

        s = Scheduler(graph, run)
        started.append(s)
        pid = s.until_step(NodeStatus.read(node_dir).progress["step"] + 5)
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait(timeout=30)
        resumed = trinity("resume", str(run), "--nodes", NODE)  # at once: the node may still be stopping
        group_killed = Leg(s, pid, process_alive(pid), list_attempts(node_dir), None, NodeStatus.read(node_dir))
        yield StoppedTwice(run, sigterm, out, group_killed, resumed)
    finally:
        for s in started:
            s.close()


def test_a_node_stops_by_itself_when_its_scheduler_group_is_killed_and_resume_right_after_finishes_exactly(
    stopped_twice: StoppedTwice, straight: dict[int, float]
) -> None:
    """kill -9 of the scheduler's process group (a batch system after its grace period, a closed terminal's
    session): the node commits a checkpoint and exits; `trinity resume` started at once waits for that."""
    leg, resumed = stopped_twice.group_killed, stopped_twice.resumed
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not leg.alive_after
    attempts = leg.attempts
    assert [a.state for a in attempts] == ["STOPPED", "STOPPED", "SUCCEEDED"]  # the first: SIGTERM's test
    assert attempts[1].message.startswith(
        f"stopped: its scheduler (pid {leg.scheduler.proc.pid}) is gone; last committed"
    )
    step = int(attempts[1].message.rsplit(" ", 1)[-1])
    assert 5 <= step < 59 and attempts[2].resumed_from_step == step
    assert losses(stopped_twice.run) == straight


@pytest.mark.slow  # end to end: the node trained until stopped, then resumed (with the group-kill test)
def test_sigterm_to_the_scheduler_stops_the_node_at_a_checkpoint_and_resume_is_exact(
    stopped_twice: StoppedTwice, straight: dict[int, float]
) -> None:
    leg, sig = stopped_twice.sigterm, signal.SIGTERM
    assert leg.scheduler.proc.returncode == 128 + sig, stopped_twice.sigterm_out
    assert f"interrupted ({sig.name}): running nodes were stopped at a checkpoint" in stopped_twice.sigterm_out
    assert not leg.alive_after  # the scheduler waited for it
    status = leg.status
    assert status.state == "FAILED" and status.message.startswith("stopped on request"), status.message
    assert "; last committed checkpoint at step " in status.message
    step = int(status.message.rsplit(" ", 1)[-1])
    assert leg.committed == step
    [attempt] = leg.attempts
    assert attempt.state == "STOPPED" and attempt.end is not None
    assert list_attempts(leg.scheduler.node_dir)[1].resumed_from_step == step  # `trinity run` again resumed it
    assert losses(stopped_twice.run) == straight


@pytest.mark.slow  # end to end: the node trained until stopped
def test_sighup_to_the_scheduler_stops_the_node_at_a_checkpoint(
    scheduler: tuple[Path, Path, list[Scheduler]],
) -> None:
    """The same stop as SIGTERM's (resumed in that test, and after Ctrl-C in tests/execute/test_resume.py)."""
    graph, run, started = scheduler
    s = Scheduler(graph, run)
    started.append(s)
    pid = s.until_step(5)
    sig = signal.SIGHUP
    s.proc.send_signal(sig)
    out, _ = s.proc.communicate(timeout=STOPS_WITHIN_S)
    assert s.proc.returncode == 128 + sig, out
    assert f"interrupted ({sig.name}): running nodes were stopped at a checkpoint" in out
    assert not process_alive(pid)  # the scheduler waited for it
    stopped_at(s.node_dir, "stopped on request")


@pytest.mark.slow  # end to end: a node trained until stopped
def test_a_detached_node_runs_on_after_its_scheduler_ends_and_resume_refuses_it_as_busy(
    scheduler: tuple[Path, Path, list[Scheduler]],
) -> None:
    _, run, started = scheduler
    # The node must still train after the scheduler exited, two CLI calls and 3 more steps, however loaded
    # the machine: 4x the micro model's layers and half its batch make its 118 steps last minutes, not
    # 15 s (the test stops it itself; the prepare nodes keep their identities).
    slow = compose(run.parent / "slow.yaml", "micro.yaml", model={"n_layers": 16}, optim={"batch": [HALF_BATCH]})
    s = Scheduler(slow, run, "--detach")
    started.append(s)
    pid = s.until_step(3)
    s.proc.send_signal(signal.SIGTERM)
    out, _ = s.proc.communicate(timeout=STOPS_WITHIN_S)
    assert s.proc.returncode == 128 + signal.SIGTERM, out
    assert f"1 node(s) keep running on their own ({NODE})" in out
    step = NodeStatus.read(s.node_dir).progress["step"]
    deadline = time.monotonic() + STOPS_WITHIN_S
    while NodeStatus.read(s.node_dir).progress["step"] < step + 3:  # it trains on, unwatched
        assert process_alive(pid) and time.monotonic() < deadline
        time.sleep(0.05)
    [node] = [n for n in json.loads(trinity("status", str(run), "--json").stdout)["nodes"] if n["id"] == NODE]
    assert (node["state"], node["live"], node["stopping"]) == ("RUNNING", True, False), node
    busy = trinity("resume", str(run), "--nodes", NODE)
    assert busy.returncode == 2 and "RUNNING in attempt 1 with a live heartbeat" in busy.stderr
    os.kill(pid, signal.SIGTERM)  # what a user does to stop it: it commits a checkpoint and exits
    wait_gone(pid)
    stopped_at(s.node_dir, "stopped on request")


@pytest.mark.slow  # multi-rank: the node trained as 2 torchrun processes, stopped and resumed
def test_the_ranks_of_a_two_rank_node_stop_together_when_the_scheduler_is_killed(
    prepared: tuple[Path, Path], two_rank_graph: Path, tmp_path: Path
) -> None:
    """Under torchrun a rank's parent is torchrun, not the scheduler: each rank's watch thread sees the
    scheduler gone; they stop at the same step (a committed checkpoint), torchrun ends with them."""
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    s = Scheduler(two_rank_graph, run)
    try:
        s.until_step(5, timeout_s=600)
        ranks = [p for p in descendants(s.proc.pid) if p != s.proc.pid]
        s.node_pids.update(ranks)
        assert len(ranks) >= 3  # torchrun and its 2 ranks
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait(timeout=30)
        for pid in ranks:
            wait_gone(pid)
        ends = read_rank_ends(s.node_dir, 1)
        assert {r: e.state for r, e in ends.items()} == {0: "STOPPED", 1: "STOPPED"}
        # Rank 0 says why, whichever rank's watch saw the scheduler gone first. (Resuming a stopped
        # 2-rank node exactly is tested with Ctrl-C in tests/execute/test_local.py.)
        stopped_at(s.node_dir, f"stopped: its scheduler (pid {s.proc.pid}) is gone")
    finally:
        s.close()
