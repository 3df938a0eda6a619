"""What a Slurm job runs: a small supervisor around the same node process the local executor starts.

The node body runs in a child process (`python -m trinity.execute.attempt`), exactly as locally. The
supervisor is the submitit callable: it allocates the attempt, records the job id, array index and
host, and waits for the child. On preemption or an approaching time limit submitit calls
`checkpoint()` (SIGUSR2): the supervisor asks the child to stop (SIGTERM: a training node commits a
checkpoint at its next step and exits) and returns itself for requeueing. The requeued job is a new
attempt and resumes from that checkpoint through the same code path as `trinity resume`.

A training node of several ranks is one job of several tasks (one per rank). Every task runs the
supervisor: task 0 allocates the attempt and writes its record, then publishes the attempt number
for the other tasks; each task starts its rank's node process with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT from Slurm's environment (trinity.distributed.env). Rank 0's process
writes the node's files. SIGUSR2 reaches every task: task 0 checkpoints and requeues (submitit),
the others stop their rank's process, and the ranks agree on the step to stop at.

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
from types import FrameType
from typing import Any

import submitit

from trinity.distributed.env import dist_env
from trinity.execute.watchdog import Stall, end_stalled, record_stall, stalled
from trinity.run.graph import RunGraph
from trinity.run.layout import NodeDir, RunDir, atomic_write_json, read_json
from trinity.run.status import AttemptRecord, NodeStatus, list_attempts, next_attempt
from trinity.spec.execution import WatchdogSpec

EXIT_STOPPED = 3  # trinity.execute.attempt's status for "stopped on request"
EXIT_RESTART = 4  # trinity.execute.attempt's status for "start me again from my last committed checkpoint"
WATCH_POLL_S = 1.0
"""How often task 0 checks the node's lease for a stall while it waits for the node process."""
STOP_WAIT_S = 240.0
"""How long a stopped child may take to commit its checkpoint (bounded by the signal delay in practice)."""
AFTER_STOP_WAIT_S = 120.0
"""How long a supervisor whose child stopped waits for Slurm to requeue or cancel the job."""
ATTEMPT_WAIT_S = 300.0
"""How long a task other than 0 waits for task 0 to publish the attempt number."""
HANDOFF_SLACK_S = 600.0
"""The tasks of one job start together: a published attempt older than this (a job id reused by a
reinstalled cluster) is not this job's."""


class NodeFailed(RuntimeError):
    """The node attempt failed; the message is the node's own."""


def slurm_ids() -> tuple[str | None, int | None]:
    """(job id as Slurm shows it, e.g. '123' or '120_3'; array task index)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}", int(task)
    return os.environ.get("SLURM_JOB_ID"), None


def preemption_signal() -> signal.Signals:
    """The signal submitit asks Slurm to send before a time limit or on preemption (USR2 by default)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


def _handoff(node_dir: NodeDir, job_id: str) -> Path:
    """Where task 0 of a multi-task job tells the other tasks the attempt number of this run of the job
    (keyed by job id and restart count: a requeued job is the same job id, a new attempt)."""
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return node_dir.root / "slurm" / f"attempt-of-{job_id}.{restart}.json"


def _await_attempt(path: Path, since: float) -> int:
    """The attempt number task 0 published (written after `since`), waiting up to ATTEMPT_WAIT_S."""
    deadline = time.monotonic() + ATTEMPT_WAIT_S
    while time.monotonic() < deadline:
        if path.is_file():
            data = read_json(path)
            if float(data["time"]) >= since:
                return int(data["attempt"])
        time.sleep(0.2)
    raise NodeFailed(f"task 0 did not publish the attempt number in {path} within {ATTEMPT_WAIT_S:.0f} s")


class NodeJob(submitit.helpers.Checkpointable):
    """Run one attempt of a node of a run (picklable: holds only paths and ids).

    In a job of several tasks (a training node of several ranks) every task runs this: task 0
    allocates the attempt and writes its record; the others wait for the attempt number and start
    their rank's node process with the rendezvous in its environment."""

    def __init__(self, run_root: str, node_id: str, depends_on: str | None = None) -> None:
        self.run_root, self.node_id, self.depends_on = run_root, node_id, depends_on
        self._child: subprocess.Popen[bytes] | None = None
        self._attempt: tuple[NodeDir, int] | None = None  # task 0: the attempt it recorded

    def __getstate__(self) -> dict[str, Any]:
        return {"run_root": self.run_root, "node_id": self.node_id, "depends_on": self.depends_on}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.run_root, self.node_id, self.depends_on = state["run_root"], state["node_id"], state.get("depends_on")
        self._child = None
        self._attempt = None

    def __call__(self) -> str:
        started = time.time()
        run = RunDir(Path(self.run_root))
        node_dir = run.node(self.node_id)
        node = RunGraph.load(run)[self.node_id]
        job_id, index = slurm_ids()
        place = dist_env()
        if place.is_primary:
            attempt = next_attempt(node_dir)
            AttemptRecord(
                attempt=attempt,
                executor="slurm",
                identity=node.identity,
                job_id=job_id,
                array_index=index,
                depends_on=self.depends_on,
                host=socket.gethostname(),
            ).write(node_dir)
            if place.world_size > 1 and job_id:
                atomic_write_json(_handoff(node_dir, job_id), {"attempt": attempt, "time": started})
            self._attempt = (node_dir, attempt)
        else:
            assert job_id, "a task of a multi-task job has SLURM_JOB_ID"
            attempt = _await_attempt(_handoff(node_dir, job_id), since=started - HANDOFF_SLACK_S)
            # Preemption (SIGUSR2) reaches every task; submitit acts on task 0 only: stop this rank too.
            signal.signal(preemption_signal(), self._stop_child)
        log = node_dir.log_file(attempt)
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "trinity.execute.attempt", str(run.root), self.node_id]
        command += ["--attempt", str(attempt), "--executor", "slurm"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if place.world_size > 1:
            env.update(place.torchrun_variables())
            env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        with open(log, "ab") as out:
            self._child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            if not place.is_primary:
                return self._rank_ended(self._child.wait(), place.rank)
            code = self._supervise(run, node_dir, attempt, RunGraph.load(run).spec(node).execution.watchdog)
        status = NodeStatus.read(node_dir)
        if code == 0 and status.state == "SUCCEEDED":
            return "SUCCEEDED"
        if code == EXIT_RESTART:  # the node asked to start again from its last committed checkpoint
            record = AttemptRecord.read(node_dir, attempt)
            if record.end is None or record.state == "RUNNING":
                record.finish(node_dir, "RESTART", code, None, "restart requested")
            self._requeue(node_dir, f"restarting after attempt {attempt}: {record.message}")
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

    def _supervise(self, run: RunDir, node_dir: NodeDir, attempt: int, dog: WatchdogSpec) -> int:
        """Task 0: wait for the node process while watching its lease for a stall (trinity.execute.watchdog);
        returns its exit status. A stall is an event; with on_stall: restart the process is killed and the job
        requeued (a new attempt resumes), or, with no restart left, the node fails."""
        child = self._child
        assert child is not None
        seen = False
        while True:
            try:
                return child.wait(timeout=WATCH_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            found = None if seen else stalled(node_dir, attempt)
            if found is None:
                continue
            seen, (lease, why) = True, found
            earlier = sum(a.state == "STALLED" for a in list_attempts(node_dir) if a.job_id == slurm_ids()[0])
            action = dog.on_stall if dog.on_stall == "warn" or earlier < dog.max_restarts else "fail"
            record_stall(
                node_dir, str(read_json(run.run_json)["run_id"]), Stall(self.node_id, attempt, why, lease, action)
            )
            if action == "warn":
                continue
            child.kill()
            child.wait()
            message = end_stalled(node_dir, attempt, why, None, int(signal.SIGKILL))
            if action == "restart":
                self._requeue(node_dir, f"requeued after attempt {attempt} {message}")
            limit = "execution.watchdog.max_restarts"
            raise NodeFailed(f"{message}, with no stall restart left ({limit} = {dog.max_restarts} reached)")

    def _requeue(self, node_dir: NodeDir, message: str) -> None:
        """Task 0: requeue this job (`scontrol requeue`): Slurm ends it and runs it again, a new attempt that
        resumes from the last committed checkpoint. Waits for Slurm to end it; raises if the requeue fails."""
        job_id, _ = slurm_ids()
        status = NodeStatus.read(node_dir)
        status.state, status.message = "PENDING", message
        status.write(node_dir)
        done = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            problem = f"{message}; but `scontrol requeue {job_id}` failed: {done.stderr.strip() or done.stdout.strip()}"
            status.state, status.message = "FAILED", f"{problem}; run `trinity resume {self.run_root}`"
            status.write(node_dir)
            raise NodeFailed(status.message)
        time.sleep(AFTER_STOP_WAIT_S)  # Slurm ends this job now; if it does not, the node fails
        raise NodeFailed(f"{message}; but Slurm did not requeue job {job_id} within {AFTER_STOP_WAIT_S:.0f} s")

    def _rank_ended(self, code: int, rank: int) -> str:
        """A task other than 0: its rank's process ended (rank 0 records the attempt)."""
        if code == 0:
            return f"rank {rank} done"
        if code == EXIT_STOPPED or code < 0:
            time.sleep(AFTER_STOP_WAIT_S)  # as task 0: Slurm is requeueing or cancelling the job
        raise NodeFailed(f"rank {rank}: node process ended with status {code}")

    def _stop_child(self, signum: int, frame: FrameType | None) -> None:
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Preemption or time limit: stop the node at a committed checkpoint, then requeue."""
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            if not _reaped_within(child.pid, STOP_WAIT_S):
                child.kill()
                self._record_killed()
        return submitit.helpers.DelayedSubmission(NodeJob(self.run_root, self.node_id, self.depends_on))

    def _record_killed(self) -> None:
        """Task 0: the node process did not stop in time and was killed; its attempt must not stay RUNNING."""
        if self._attempt is None:
            return
        node_dir, attempt = self._attempt
        record = AttemptRecord.read(node_dir, attempt)
        if record.state == "RUNNING":
            message = f"did not stop within {STOP_WAIT_S:.0f} s of the stop request; killed before the requeue"
            record.finish(node_dir, "FAILED", None, int(signal.SIGKILL), message)


def _reaped_within(pid: int, seconds: float) -> bool:
    """Wait for a child to exit, from a signal handler: the interrupted `Popen.wait()` below it holds the
    Popen's wait lock, so `Popen.wait(timeout)` would spin until its timeout; waitpid does not need it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # already reaped
            return True
        if done:
            return True
        time.sleep(0.2)
    return False
