"""Node status files and heartbeat leases (trinity/run/status.py): when a lease means the node died.

Every case goes through `lease_is_stale` (what explain and resume used before one rule existed) and
`lease_liveness` (the one rule, with its reason)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trinity.run.layout import NodeDir, atomic_write_json
from trinity.run.status import (
    Heartbeat,
    Lease,
    StepProgress,
    lease_is_stale,
    lease_liveness,
    lease_stall,
    process_start,
)
from trinity.spec.execution import WatchdogSpec


def lease(**fields: Any) -> dict[str, Any]:
    """A lease of this process on this host, beating now, with `fields` changed."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "period_s": 30, **fields}


@pytest.fixture
def node(tmp_path: Path) -> NodeDir:
    return NodeDir(tmp_path / "n")


def test_stale_lease_means_died(node: NodeDir) -> None:
    assert lease_is_stale(node)  # no lease at all
    atomic_write_json(node.lease, lease())
    assert not lease_is_stale(node)
    atomic_write_json(node.lease, lease(time=time.time() - 100))
    assert lease_is_stale(node)  # no heartbeat for 3 periods
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    atomic_write_json(node.lease, lease(pid=dead.pid))
    assert lease_is_stale(node)  # fresh heartbeat, but the process is gone


def test_the_heartbeat_writes_a_lease_that_the_rule_calls_live(node: NodeDir) -> None:
    with Heartbeat(node, attempt=2, period_s=30):
        live = lease_liveness(node, attempt=2)
        assert live.live and live.lease is not None and live.lease.start == process_start(os.getpid())
        assert f"pid {os.getpid()} on {socket.gethostname()}" in live.why
        assert not lease_liveness(node, attempt=3).live  # a lease left by another attempt


@pytest.mark.parametrize("cut", [0, 1, 20, -2])
def test_a_truncated_lease_is_stale_with_a_reason_not_an_exception(node: NodeDir, cut: int) -> None:
    text = json.dumps(lease())
    node.lease.parent.mkdir(parents=True)
    node.lease.write_text(text[:cut])
    assert lease_is_stale(node)
    assert "damaged lease.json" in lease_liveness(node).why


@pytest.mark.parametrize(
    "damage",
    [{"pid": 0}, {"pid": -1}, {"pid": True}, {"time": "soon"}, {"period_s": 0}, {"period_s": 1e12}, {"host": ""}],
)
def test_a_lease_with_impossible_values_is_stale(node: NodeDir, damage: dict[str, Any]) -> None:
    """pid 0 or -1 would address a process group (os.kill(0, 0) succeeds); an endless period never expires."""
    atomic_write_json(node.lease, lease(**damage))
    assert lease_is_stale(node)
    assert lease_liveness(node).why.startswith("damaged lease.json (")


def test_a_lease_dated_in_the_future_on_another_host_is_not_trusted(node: NodeDir) -> None:
    atomic_write_json(node.lease, lease(host="elsewhere", time=time.time() + 3600))
    assert lease_is_stale(node)
    assert "in the future on elsewhere" in lease_liveness(node).why
    atomic_write_json(node.lease, lease(host="elsewhere", time=time.time() + 5))  # within the clock-skew allowance
    assert not lease_is_stale(node)


def test_an_old_heartbeat_on_another_host_is_stale(node: NodeDir) -> None:
    atomic_write_json(node.lease, lease(host="elsewhere", time=time.time() - 412, period_s=2))
    assert lease_is_stale(node)
    assert lease_liveness(node).why == "no heartbeat for 412 s (period 2 s)"


def test_an_exited_process_not_yet_collected_is_dead(node: NodeDir) -> None:
    """A zombie: `os.kill(pid, 0)` still succeeds for it, but it trains no more."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        atomic_write_json(node.lease, lease(pid=child.pid))
        assert lease_is_stale(node)
        assert "is gone" in lease_liveness(node).why
    finally:
        child.wait()


def test_a_reused_pid_is_not_the_node(node: NodeDir) -> None:
    """The lease's pid now belongs to another process (here: ours, started at another time)."""
    start = process_start(os.getpid())
    assert start is not None
    atomic_write_json(node.lease, lease(start=start - 1))
    assert lease_is_stale(node)
    assert "was reused by another process" in lease_liveness(node).why


def test_a_node_whose_scheduler_is_gone_is_live_and_orphaned(node: NodeDir) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    atomic_write_json(node.lease, lease(scheduler={"pid": gone.pid, "start": 1}))
    live = lease_liveness(node)
    assert live.live and live.orphaned and f"its scheduler (pid {gone.pid}) is gone" in live.why
    atomic_write_json(node.lease, lease(scheduler={"pid": os.getpid(), "start": process_start(os.getpid())}))
    assert not lease_liveness(node).orphaned


# -- the stall rule (execution.watchdog) --------------------------------------------------------------


def test_lease_stall_counts_from_the_last_step_to_now_on_this_host() -> None:
    now = 1_000_000.0
    beat = Lease.model_validate(lease(time=now - 1, step=37, step_time=now - 412, stall_after_s=60.0))
    assert lease_stall(beat, now) == "no step for 412 s since step 37 (allowed 60 s)"
    assert lease_stall(beat, now - 412 + 60) is None  # exactly the allowance: not yet
    assert lease_stall(beat, now - 412 + 61) is not None
    first = Lease.model_validate(lease(time=now, step=None, step_time=now - 1900, stall_after_s=1800.0))
    assert lease_stall(first, now) == "no step for 1900 s since the attempt began (allowed 1800 s)"
    # A node that does not step (tokenize, prepare, eval) reports no step time: never stalled.
    assert lease_stall(Lease.model_validate(lease(time=now - 5000)), now) is None


def test_lease_stall_on_another_host_measures_to_its_last_heartbeat() -> None:
    """Another host's clock may be off: the idle time is the node host's, last step to last heartbeat."""
    remote = lease(host="elsewhere", time=500.0, step=3, step_time=100.0, stall_after_s=300.0)
    assert lease_stall(Lease.model_validate(remote), now=1e9) == "no step for 400 s since step 3 (allowed 300 s)"
    assert lease_stall(Lease.model_validate({**remote, "time": 399.0}), now=1e9) is None


def test_an_old_lease_without_step_fields_parses_and_is_never_stalled(node: NodeDir) -> None:
    """lease.json as written before the watchdog existed (no step, step_time, stall_after_s)."""
    atomic_write_json(node.lease, lease(attempt=1))
    live = lease_liveness(node, 1)
    assert live.live and live.lease is not None
    assert (live.lease.step, live.lease.step_time, live.lease.stall_after_s) == (None, None, None)
    assert lease_stall(live.lease) is None


def test_step_progress_allowance_is_first_step_s_then_the_median_step_time_times_the_factor() -> None:
    progress = StepProgress(WatchdogSpec(min_stall_s=60, stall_factor=10, first_step_s=1800))
    assert progress.snapshot() == (None, None, None)  # not stepping yet: no stall rule
    progress.begin()
    step, began, allowed = progress.snapshot()
    assert step is None and began is not None and allowed == 1800
    for n, seconds in enumerate([2.0, 30.0, 3.0], start=1):  # median 3 s: 10 x 3 = 30 s < 60 s
        progress.step_done(n, seconds)
    assert progress.snapshot()[0] == 3 and progress.allowance() == 60
    for n, seconds in enumerate([9.0, 8.0, 7.0, 8.5], start=4):  # median of 7 steps: 8 s -> 80 s
        progress.step_done(n, seconds)
    assert progress.allowance() == 80
    given = StepProgress(WatchdogSpec(stall_after_s=5, first_step_s=100))
    assert given.allowance() == 100  # the first step's warm-up
    given.step_done(1, 50.0)
    assert given.allowance() == 5  # then as given, whatever the step time


def test_the_heartbeat_carries_the_steps_into_the_lease(node: NodeDir) -> None:
    progress = StepProgress(WatchdogSpec(stall_after_s=7))
    progress.begin()
    progress.step_done(12, 0.5)
    with Heartbeat(node, attempt=1, period_s=30, progress=progress):
        written = Lease.model_validate_json(node.lease.read_text())
    assert (written.step, written.stall_after_s) == (12, 7)
    assert written.step_time is not None and abs(written.step_time - time.time()) < 5
