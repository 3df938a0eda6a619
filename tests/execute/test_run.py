"""One run, one scheduler: the run lock (trinity/execute/run.py)."""

from __future__ import annotations

from pathlib import Path

from trinity.errors import RunError
from trinity.execute.run import RunLock
from trinity.run.layout import RunDir


def test_a_second_scheduler_on_the_same_run_is_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with RunLock(run):
        try:
            with RunLock(run):
                raise AssertionError("a second lock was granted")
        except RunError as exc:
            assert "already being run by" in str(exc)
