"""Kill safety of asynchronous checkpoints, and retention by policy, on a real training node.

The micro graph's pretraining node (59 steps) runs with `execution.checkpoint: {every: 2, keep_last: 2,
keep_every: 10, async: true}` and is killed with SIGKILL twice: at a random moment past a random step,
and past a later random step at the moment a checkpoint is being written (its temporary folder exists:
the save in flight). After each
kill every committed checkpoint must load with its checksums (never a committed incomplete one); the
resumed node must reproduce the uninterrupted run (every=20, synchronous: the session's `straight`
run) bit for bit, losses and final weights; and the checkpoints left are exactly the policy's closed
form: every multiple of 10 and the last two committed steps (58 and the final 59).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_runs import NODE, losses, sigint_as_ctrl_c
from tests.conftest import compose
from trinity.nodes.checkpoints import final_state
from trinity.run.layout import NodeDir, RunDir, read_json
from trinity.run.status import NodeStatus, list_attempts
from trinity.store.checkpoint import load_checkpoint
from trinity.store.checkpoint_commit import list_checkpoints

POLICY = {"every": 2, "keep_last": 2, "keep_every": 10, "async": True}
KEPT = [10, 20, 30, 40, 50, 58, 59]  # multiples of keep_every, and the last keep_last committed (59: the end)


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_ctrl_c,
    )


def kill_node(proc: subprocess.Popen[str], node_dir: NodeDir, when: str, past: int) -> int:
    """SIGKILL the node process once it is past step `past` and, for when="saving", while a checkpoint
    of it is being written (a temporary folder exists); returns the step it had reported."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the node ended before the kill"
        step = NodeStatus.read(node_dir).progress.get("step", 0)
        saving = when != "saving" or any(node_dir.checkpoints.glob(".tmp-*"))
        if step > past and saving and node_dir.lease.is_file():
            break
        time.sleep(0.002)
    os.kill(read_json(node_dir.lease)["pid"], signal.SIGKILL)
    proc.communicate(timeout=120)
    return int(step)


def committed_all_load(node_dir: NodeDir) -> list[int]:
    """Steps of the committed checkpoints, each loaded with its checksums (raises if one is incomplete)."""
    steps = []
    for c in list_checkpoints(node_dir.checkpoints):
        if c.committed:
            load_checkpoint(c.path)
            steps.append(c.step)
    return steps


@pytest.mark.slow  # the micro node trained over three attempts
def test_sigkill_during_async_saves_then_resume_is_bit_exact_and_keeps_the_policy(
    prepared: tuple[Path, Path], straight_run: Path, straight: dict[int, float], tmp_path: Path
) -> None:
    _, prepared_run = prepared
    graph = compose(tmp_path / "async.yaml", "micro.yaml", execution={"checkpoint": POLICY})
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    node_dir = RunDir(run).node(NODE)
    rng = random.Random(os.getpid())

    proc = start(["run", str(graph), "--run-dir", str(run), "--nodes", NODE])
    killed = [kill_node(proc, node_dir, "any", rng.randint(3, 15))]
    assert committed_all_load(node_dir)
    proc = start(["resume", str(run), "--nodes", NODE])
    killed.append(kill_node(proc, node_dir, "saving", killed[-1] + rng.randint(2, 12)))
    committed_all_load(node_dir)
    assert killed[-1] < 59, killed

    resumed = subprocess.run(
        [sys.executable, "-m", "trinity.cli", "resume", str(run), "--nodes", NODE], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["FAILED", "FAILED", "SUCCEEDED"]
    assert all(a.resumed_from_step is not None for a in attempts[1:])

    assert losses(run) == straight  # every step once, bit for bit
    ours, theirs = final_state(node_dir)["model"], final_state(RunDir(straight_run).node(NODE))["model"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert committed_all_load(node_dir) == KEPT
    assert sorted(p.name for p in node_dir.checkpoints.iterdir()) == [f"step-{s:08d}" for s in KEPT]
