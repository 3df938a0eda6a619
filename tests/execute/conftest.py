"""The micro graph as a 2-rank job (HSDP 1 x 2, experts over 2 ranks) and its local run, shared by the
local and Slurm executor tests (the 1-rank runs are in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli_runs import NODE, trinity
from tests.conftest import compose


def slurm_cluster_problem() -> str | None:
    """Why the local Slurm cluster cannot be used (None: it answers)."""
    if not os.environ.get("SLURM_CONF") or shutil.which("sinfo") is None:
        return "no Slurm client or SLURM_CONF (run scripts/slurm-local.sh up and export SLURM_CONF)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"sinfo failed: {probe.stderr.strip()}"
    return None


def require_slurm_cluster() -> None:
    """Skip the test when the local cluster is not usable; fail it when CI requires Slurm (TRINITY_REQUIRE_SLURM=1)."""
    problem = slurm_cluster_problem()
    if problem is not None:
        if os.environ.get("TRINITY_REQUIRE_SLURM") == "1":
            pytest.fail(f"TRINITY_REQUIRE_SLURM=1 but the Slurm cluster is not usable: {problem}")
        pytest.skip(problem)


def descendants(root: int) -> list[int]:
    """`root` and every process below it (whatever session each is in), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        found += frontier
    return found


TWO_RANKS = {"gpus_per_node": 2, "fsdp_group": 2, "ep": 2}
"""The `parallel` overrides that make the micro graph's training nodes 2 ranks."""


@pytest.fixture(scope="session")
def two_rank_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compose(tmp_path_factory.mktemp("two") / "micro.yaml", "micro.yaml", parallel=TWO_RANKS)


@pytest.fixture(scope="session")
def two_rank_run(prepared: tuple[Path, Path], two_rank_graph: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretraining node run as 2 ranks by the local executor (tokenizer and prepare reused)."""
    _, prepared_run = prepared
    run = tmp_path_factory.mktemp("local2") / "run"
    shutil.copytree(prepared_run, run)
    result = trinity("run", str(two_rank_graph), "--run-dir", str(run), "--nodes", NODE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 node(s) to run, 2 reused" in result.stdout  # parallel is not part of any identity
    return run
