"""The pretraining node run as a user runs it on the micro graph: a loss that is not finite fails the node
naming the step that diverged, with what to do next that works, and commits no final checkpoint."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from tests.cli_runs import NODE, losses, trinity
from trinity.run.layout import RunDir
from trinity.run.status import NodeStatus


def test_non_finite_loss_fails_clearly_and_commits_nothing_bad(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    result = trinity(
        "run",
        str(graph),
        "--run-dir",
        str(run),
        "--nodes",
        NODE,
        "--set",
        "optim.adamw.lr=1.0e+30",
        "--set",
        "stability.grad_clip=null",
    )
    assert result.returncode == 1
    status = NodeStatus.read(RunDir(run).node(NODE))
    assert status.state == "FAILED"
    assert "Lower the learning rate" in status.message
    assert "nan" in status.message.lower() or "inf" in status.message.lower()
    assert not (RunDir(run).node(NODE).outputs / "final.json").exists()
    # The step named is the one that diverged: the one after the last step telemetry logged (finite).
    logged = losses(run)
    assert logged and all(math.isfinite(v) for v in logged.values())
    assert status.message.startswith(f"step {max(logged) + 1}: "), status.message
    # Its advice works with the stored spec left as it is: a re-run with a lower lr, not `trinity resume`.
    assert f"trinity run GRAPH --run-dir {run} --set optim.muon.lr=" in status.message
    assert "--set optim.adamw.lr=5e+29" in status.message and "`trinity resume` would not help" in status.message
