"""The worker side of an attempt (`python -m trinity.execute.attempt RUN NODE`): what it checks before a
node's body runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.cli_runs import NODE
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
