"""The worker side of an attempt (`python -m trinity.execute.attempt RUN NODE`): what it checks before a
node's body runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_runs import NODE
from tests.execute.conftest import descendants
from trinity.execute.run import write_run
from trinity.run.layout import RunDir
from trinity.run.status import AttemptRecord, NodeStatus
from trinity.spec.loading import load_experiment


def test_a_node_launched_with_the_wrong_number_of_processes_fails_with_both_numbers(
    prepared: tuple[Path, Path], two_rank_graph: Path, tmp_path: Path
) -> None:
    """The entry point checks the launched world size against the spec's (here: 1 process for 2 ranks)."""
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    write_run(load_experiment(two_rank_graph), run)
    node_dir = RunDir(run).node(NODE)
    AttemptRecord(attempt=1, executor="local", identity="x").write(node_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE") and not k.startswith("SLURM_")}
    code = subprocess.run(
        [sys.executable, "-m", "trinity.execute.attempt", str(run), NODE, "--attempt", "1"], env=env, timeout=300
    ).returncode
    assert code == 1
    message = NodeStatus.read(node_dir).message
    assert "2 processes (parallel.nodes x parallel.gpus_per_node = 1 x 2)" in message and "launched as 1" in message


# -- a node watches the scheduler that launched it -------------------------------------------------

NODE_SCRIPT = """
import os, signal, sys, time
import trinity.execute.attempt as attempt
attempt.WATCH_PERIOD_S = float(sys.argv[2])
watch = attempt.SchedulerWatch.from_env(lambda: os.kill(os.getpid(), signal.SIGTERM))
def on_term(signum, frame):
    with open(sys.argv[1], "w") as f:
        f.write(watch.reason if watch.gone() else "SIGTERM, but the scheduler is there")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
watch.start()
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""
LAUNCHER = """
import subprocess, sys
subprocess.Popen(sys.argv[1:], start_new_session=True).wait()
"""


def _launch_node(script_args: list[str], via_launcher: bool) -> str:
    """The python code a fake scheduler runs: start the node (directly, or under a launcher like torchrun)
    with the scheduler's pid and start time in its environment, then wait to be killed."""
    command = [sys.executable, "-c", NODE_SCRIPT, *script_args]
    if via_launcher:
        command = [sys.executable, "-c", LAUNCHER, *command]
    return (
        "import os, subprocess, time\n"
        "from trinity.run.status import own_process\n"
        "me = own_process()\n"
        "env = {**os.environ, 'TRINITY_SCHEDULER_PID': str(me.pid), 'TRINITY_SCHEDULER_START': str(me.start)}\n"
        f"subprocess.Popen({command!r}, env=env, start_new_session=True)\n"
        "time.sleep(120)\n"
    )


@pytest.mark.parametrize(
    ("via_launcher", "period_s"),
    [(False, 3600.0), (True, 0.2)],
    ids=["child: the parent-death signal alone", "grandchild (a torchrun rank): the watch thread"],
)
def test_a_node_gets_sigterm_when_its_scheduler_is_killed(tmp_path: Path, via_launcher: bool, period_s: float) -> None:
    """kill -9 of the scheduler reaches the node as SIGTERM, the stop request, with the reason: as its child
    through the kernel's parent-death signal (here the watch thread sleeps an hour, so nothing else could),
    under a launcher through the watch thread that polls the scheduler's pid and start time."""
    mark = tmp_path / "stopped"
    scheduler = subprocess.Popen(
        [sys.executable, "-c", _launch_node([str(mark), str(period_s)], via_launcher)], start_new_session=True
    )
    node_pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{mark}.ready").exists():
            assert time.monotonic() < deadline and scheduler.poll() is None
            time.sleep(0.05)
        node_pids = [p for p in descendants(scheduler.pid) if p != scheduler.pid]
        os.kill(scheduler.pid, signal.SIGKILL)
        scheduler.wait()
        while not mark.exists() or not mark.read_text():
            assert time.monotonic() < deadline, "the node was not told that its scheduler is gone"
            time.sleep(0.05)
        assert mark.read_text() == f"stopped: its scheduler (pid {scheduler.pid}) is gone"
    finally:
        for pid in node_pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(scheduler.pid, signal.SIGKILL)
        scheduler.wait()


def test_a_node_whose_scheduler_is_gone_before_it_starts_exits_without_touching_the_node(
    micro_graph: Path, tmp_path: Path
) -> None:
    """A scheduler killed right after a launch: `trinity resume` may already run the next attempt, so the late
    process writes neither status.json nor the lease; it ends its own attempt record only."""
    run, _ = write_run(load_experiment(micro_graph), tmp_path / "run")
    node_dir = run.node("tokenizer")
    AttemptRecord(attempt=1, executor="local", identity="x").write(node_dir)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    env = {**os.environ, "TRINITY_SCHEDULER_PID": str(gone.pid)}
    command = [sys.executable, "-m", "trinity.execute.attempt", str(run.root), "tokenizer", "--attempt", "1"]
    assert subprocess.run(command, env=env, timeout=300).returncode == 3
    assert not node_dir.status.exists() and not node_dir.lease.exists()
    record = AttemptRecord.read(node_dir, 1)
    assert record.state == "STOPPED" and record.message == f"its scheduler (pid {gone.pid}) was gone before it started"
