"""A Slurm task 0 whose node process had to be killed at a stop request leaves no RUNNING attempt."""

from __future__ import annotations

import signal
from pathlib import Path

from trinity.execute.slurm_job import STOP_WAIT_S, NodeJob
from trinity.run.layout import RunDir
from trinity.run.status import AttemptRecord, list_attempts


def test_killed_attempt_is_recorded_failed(tmp_path: Path) -> None:
    node_dir = RunDir(tmp_path / "run").node("pretrain/phase1")
    AttemptRecord(attempt=1, executor="slurm", identity="abc", job_id="7").write(node_dir)
    job = NodeJob(str(tmp_path / "run"), "pretrain/phase1")
    job._attempt = (node_dir, 1)
    job._record_killed()
    (record,) = list_attempts(node_dir)
    assert record.state == "FAILED" and record.signal == int(signal.SIGKILL) and record.end is not None
    assert f"did not stop within {STOP_WAIT_S:.0f} s" in record.message


def test_an_attempt_that_ended_keeps_its_state(tmp_path: Path) -> None:
    node_dir = RunDir(tmp_path / "run").node("pretrain/phase1")
    record = AttemptRecord(attempt=1, executor="slurm", identity="abc", job_id="7")
    record.write(node_dir)
    record.finish(node_dir, "STOPPED", 3, None, "stopped on request")
    job = NodeJob(str(tmp_path / "run"), "pretrain/phase1")
    job._attempt = (node_dir, 1)
    job._record_killed()
    assert list_attempts(node_dir)[0].state == "STOPPED"
    # Not pickled: a requeued job starts without the previous run's attempt.
    assert "_attempt" not in job.__getstate__()
