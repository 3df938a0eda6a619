"""What a Slurm job runs: a small supervisor around the same node process the local executor starts.

The node body runs in a child process (`python -m trinity.nodes.entry`), exactly as locally. The
supervisor is the submitit callable: it allocates the attempt, records the job id, array index and
host, and waits for the child. On preemption or an approaching time limit submitit calls
`checkpoint()` (SIGUSR2): the supervisor asks the child to stop (SIGTERM: a training node commits a
checkpoint at its next step and exits) and returns itself for requeueing. The requeued job is a new
attempt and resumes from that checkpoint through the same code path as `trinity resume`.

A job whose child was stopped by a signal without SIGUSR2 (`scontrol requeue`, `scancel`) waits for
Slurm to finish the requeue or the cancellation; if neither comes, it fails and `trinity resume`
picks the node up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from trinity.execute.rundir import RunDir, read_json
from trinity.execute.status import AttemptRecord, NodeStatus, next_attempt

EXIT_STOPPED = 3  # trinity.nodes.entry's status for "stopped on request"
STOP_WAIT_S = 240.0
"""How long a stopped child may take to commit its checkpoint (bounded by the signal delay in practice)."""
AFTER_STOP_WAIT_S = 120.0
"""How long a supervisor whose child stopped waits for Slurm to requeue or cancel the job."""


class NodeFailed(RuntimeError):
    """The node attempt failed; the message is the node's own."""


def slurm_ids() -> tuple[str | None, int | None]:
    """(job id as Slurm shows it, e.g. '123' or '120_3'; array task index)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}", int(task)
    return os.environ.get("SLURM_JOB_ID"), None


class NodeJob(submitit.helpers.Checkpointable):
    """Run one attempt of a node of a run (picklable: holds only paths and ids)."""

    def __init__(self, run_root: str, node_id: str, depends_on: str | None = None) -> None:
        self.run_root, self.node_id, self.depends_on = run_root, node_id, depends_on
        self._child: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"run_root": self.run_root, "node_id": self.node_id, "depends_on": self.depends_on}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.run_root, self.node_id, self.depends_on = state["run_root"], state["node_id"], state.get("depends_on")
        self._child = None

    def __call__(self) -> str:
        run = RunDir(Path(self.run_root))
        node_dir = run.node(self.node_id)
        node = {n["id"]: n for n in read_json(run.graph_json)["nodes"]}[self.node_id]
        attempt = next_attempt(node_dir)
        job_id, index = slurm_ids()
        AttemptRecord(
            attempt=attempt,
            executor="slurm",
            identity=node["identity"],
            job_id=job_id,
            array_index=index,
            depends_on=self.depends_on,
            host=socket.gethostname(),
        ).write(node_dir)
        log = node_dir.log_file(attempt)
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "trinity.nodes.entry",
            str(run.root),
            self.node_id,
            "--attempt",
            str(attempt),
            "--executor",
            "slurm",
        ]
        with open(log, "ab") as out:
            self._child = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
            code = self._child.wait()
        status = NodeStatus.read(node_dir)
        if code == 0 and status.state == "SUCCEEDED":
            return "SUCCEEDED"
        record = AttemptRecord.read(node_dir, attempt)
        if record.exit_code is None and record.signal is None:
            record.exit_code, record.signal = (code, None) if code >= 0 else (None, -code)
            if record.state == "RUNNING":
                record.state, record.message = "FAILED", f"node process ended with {code}"
            record.write(node_dir)
        if code == EXIT_STOPPED or code < 0:
            # Stopped by a signal Slurm sent (requeue, cancel, preemption): let Slurm finish what it started.
            time.sleep(AFTER_STOP_WAIT_S)
        raise NodeFailed(status.message or f"node process ended with status {code}")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Preemption or time limit: stop the node at a committed checkpoint, then requeue."""
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                child.kill()
        return submitit.helpers.DelayedSubmission(NodeJob(self.run_root, self.node_id, self.depends_on))
