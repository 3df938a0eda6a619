"""A prepare node's shards on the real local Slurm cluster: one job array, then the node's own job.

Without a cluster these tests skip, unless TRINITY_REQUIRE_SLURM=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.cli_runs import trinity
from tests.conftest import TEST_GRAPHS
from tests.execute.conftest import require_slurm_cluster
from trinity.data.store import open_store
from trinity.execute.slurm_shards import shard_arrays
from trinity.nodes.prepare import store_paths
from trinity.run.layout import RunDir
from trinity.run.status import list_attempts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(autouse=True, scope="module")
def cluster() -> None:
    require_slurm_cluster()


def sacct_tasks(job_id: str) -> dict[str, str]:
    """Task id -> state of every task of a job array, as Slurm's accounting has them."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "JobID,State"], capture_output=True, text=True, timeout=60
    ).stdout
    return dict(line.split("|")[:2] for line in out.split() if line)


def test_shards_of_a_phase_run_as_one_job_array_and_give_the_local_store(tmp_path: Path) -> None:
    graph = str(TEST_GRAPHS / "micro.yaml")
    sets = ["--set", "execution.prepare.shards=3"]
    slurm = ["--executor", "slurm", "--set", "execution.slurm.cpus_per_task=1"]
    slurm += ["--set", "execution.slurm.time_min={default: 20}"]
    ran = trinity("run", graph, "--run-dir", str(tmp_path / "slurm"), "--nodes", "prepare/phase1", *slurm, *sets)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    run = RunDir(tmp_path / "slurm")
    array_id = shard_arrays(run)["prepare/phase1"]
    tasks = sacct_tasks(array_id)
    assert sorted(tasks) == [f"{array_id}_{i}" for i in range(3)], tasks
    assert set(tasks.values()) == {"COMPLETED"}, tasks
    # The node's own job waited for the whole array, and found the shards' pieces committed.
    node = run.node("prepare/phase1")
    (attempt,) = [a for a in list_attempts(node) if a.executor == "slurm"]
    assert f"afterany:{array_id}" in (attempt.depends_on or "")
    metrics = json.loads((node.outputs / "metrics.json").read_text())
    pieces = metrics["pieces"]
    assert pieces["tokenized"] == 0 and pieces["kept"] == pieces["referenced"] > 0, pieces
    # The same store as one local process makes with one shard.
    one = ["--set", "execution.prepare.shards=1", "--set", "execution.prepare.workers=1"]
    local = trinity("run", graph, "--run-dir", str(tmp_path / "local"), "--nodes", "prepare/phase1", *one)
    assert local.returncode == 0, local.stdout + local.stderr
    for a, b in zip(
        store_paths(node.outputs / "store"),
        store_paths(RunDir(tmp_path / "local").node("prepare/phase1").outputs / "store"),
        strict=True,
    ):
        sa, sb = open_store(a), open_store(b)
        np.testing.assert_array_equal(sa.tokens, sb.tokens)
        np.testing.assert_array_equal(sa.doc_offsets, sb.doc_offsets)
        np.testing.assert_array_equal(sa.doc_source, sb.doc_source)
