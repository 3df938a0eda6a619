"""The stall watchdog: sees, from outside a node's processes, that its optimizer steps stopped advancing.

A hung process cannot be trusted to notice its own hang, so the check runs in the process that launched
the attempt: the local scheduler's loop (trinity.execute.scheduler), or the Slurm job's supervisor
(trinity.execute.slurm_job). Both read the node's heartbeat lease, whose thread keeps beating while the
training loop hangs, and judge it with the one stall rule, `trinity.run.status.lease_stall`; the lease
carries the last completed step, when it completed and the allowance the node computed from
`execution.watchdog`. A stall is recorded once per attempt as an `events` row of kind `stall` (written
as the `watchdog` writer of the attempt's telemetry, beside the node's own parts); with
`on_stall: restart` the launcher then kills the attempt and starts one that resumes from the last
committed checkpoint, at most `max_restarts` times.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

from trinity.run.graph import RunGraph
from trinity.run.layout import NodeDir, RunDir, read_json
from trinity.run.status import AttemptRecord, Lease, lease_liveness, lease_stall
from trinity.spec.execution import WatchdogSpec
from trinity.store.telemetry import TelemetryWriter


@dataclass(frozen=True)
class Stall:
    """A stalled attempt, as its lease showed it."""

    node_id: str
    attempt: int
    why: str
    """What `trinity status` shows, e.g. 'no step for 412 s since step 37 (allowed 60 s)'."""
    lease: Lease
    action: str
    """warn (reported only), restart (killed, a new attempt resumes) or fail (killed, no restart left)."""


def stalled(node_dir: NodeDir, attempt: int, now: float | None = None) -> tuple[Lease, str] | None:
    """The lease of `attempt` and why it is stalled, if its process is alive and its steps stopped."""
    liveness = lease_liveness(node_dir, attempt, now)
    lease = liveness.lease
    if not liveness.live or lease is None or lease.attempt != attempt:
        return None
    why = lease_stall(lease, now)
    return None if why is None else (lease, why)


def record_stall(node_dir: NodeDir, run_id: str, stall: Stall, now: float | None = None) -> None:
    """The `stall` events row of the attempt (step: its last completed step). Never raises: a watchdog that
    cannot write telemetry still acts, and says so on stderr."""
    lease = stall.lease
    step = lease.step if lease.step is not None else _resumed_step(node_dir, stall.attempt)
    seconds = (now if now is not None else time.time()) - (lease.step_time or lease.time)
    try:
        writer = TelemetryWriter(node_dir, stall.node_id, stall.attempt, run_id, writer="watchdog", tensorboard=False)
        with writer:
            writer.log_event(
                step,
                "stall",
                stall.why,
                last_step=lease.step,
                seconds_since_step=round(seconds, 3),
                stall_after_s=lease.stall_after_s,
                action=stall.action,
            )
    except Exception as exc:  # the kill and restart must not depend on the event
        print(f"trinity: {stall.node_id}: could not record the stall event ({exc})", file=sys.stderr, flush=True)


def _resumed_step(node_dir: NodeDir, attempt: int) -> int:
    with contextlib.suppress(Exception):
        return AttemptRecord.read(node_dir, attempt).resumed_from_step or 0
    return 0


def end_stalled(node_dir: NodeDir, attempt: int, why: str, exit_code: int | None, sig: int | None) -> str:
    """End the killed attempt's record as STALLED (kept if its end is written already); returns the message."""
    message = f"stalled: {why}; killed by the watchdog"
    record = AttemptRecord.read(node_dir, attempt)
    if record.end is None or record.state in ("RUNNING", "FAILED"):
        record.finish(node_dir, "STALLED", exit_code, sig, message)
    return message


@dataclass
class Watchdog:
    """The local scheduler's watchdog: `check` each running attempt every poll; it reports each stalled attempt
    once (after writing its event) and counts the node's stall restarts against `max_restarts`."""

    run: RunDir
    _graph: RunGraph | None = field(default=None, repr=False)
    _specs: dict[str, WatchdogSpec] = field(default_factory=dict, repr=False)
    _seen: set[tuple[str, int]] = field(default_factory=set, repr=False)
    restarts: dict[str, int] = field(default_factory=dict)
    """Stall restarts of each node so far (this scheduler run)."""
    _run_id: str | None = field(default=None, repr=False)

    def spec(self, node_id: str) -> WatchdogSpec:
        if node_id not in self._specs:
            if self._graph is None:
                self._graph = RunGraph.load(self.run)
            self._specs[node_id] = self._graph.spec(self._graph[node_id]).execution.watchdog
        return self._specs[node_id]

    def check(self, node_id: str, attempt: int, now: float | None = None) -> Stall | None:
        """A stall of this attempt seen for the first time (its event written), or None."""
        if (node_id, attempt) in self._seen:
            return None
        node_dir = self.run.node(node_id)
        found = stalled(node_dir, attempt, now)
        if found is None:
            return None
        self._seen.add((node_id, attempt))
        lease, why = found
        dog = self.spec(node_id)
        action: str = dog.on_stall
        if action == "restart":
            done = self.restarts.get(node_id, 0)
            if done >= dog.max_restarts:
                action = "fail"
            else:
                self.restarts[node_id] = done + 1
        stall = Stall(node_id, attempt, why, lease, action)
        if self._run_id is None:
            self._run_id = str(read_json(self.run.run_json)["run_id"])
        record_stall(node_dir, self._run_id, stall, now)
        print(f"trinity: {node_id} attempt {attempt} stalled: {why} ({action})", file=sys.stderr, flush=True)
        return stall
