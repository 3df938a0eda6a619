"""Attempts whose process ended without saying how: found and closed out as KILLED.

An attempt's record (attempts/NNNN.json) is RUNNING until its process, or the scheduler that saw it
exit, writes how it ended. A process killed by SIGKILL (`kill -9`, the out-of-memory killer), or a
machine that stopped, writes nothing; when no scheduler watched it (the scheduler was killed too, a
`--detach` run) nobody did, and the record stayed RUNNING with no end: "which attempt was killed" had
no answer in SQL. `close_dead_attempts` ends such a record as KILLED with an end time and says why;
`trinity status` and every scheduler (before it runs a node) call it.

A record is dead when a later attempt exists (it ended before that one started), or when the heartbeat
lease of its attempt is not live (trinity.run.status: lease_liveness, the rule `resume` uses); its end
is then its last heartbeat. An attempt without a lease of its own is starting (the lease is the first
thing it writes) until START_GRACE_S after its record was made. The signal stays null: only a parent
sees it, and there was none. Slurm attempts are left to the Slurm reconciliation (sacct knows more).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from trinity.run.layout import NodeDir
from trinity.run.status import AttemptRecord, lease_liveness, list_attempts

START_GRACE_S = 120.0
"""How long an attempt record may exist without a heartbeat lease of its own and still be starting."""
KILLED = "KILLED"


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def dead(node_dir: NodeDir, record: AttemptRecord, later: AttemptRecord | None, now: float) -> tuple[str, str] | None:
    """(end, why) when `record` (RUNNING; `later`: the next attempt's record, if any) belongs to a process that
    is gone; None while it may still run (see the module docstring)."""
    if later is not None:
        return later.start, f"it ended before attempt {later.attempt} started"
    liveness = lease_liveness(node_dir, record.attempt, now)
    if liveness.live:
        return None
    lease = liveness.lease
    if lease is not None and lease.attempt == record.attempt:
        end = _iso(min(lease.time, now))
        return end, f"{liveness.why}; its last heartbeat was at {end}"
    if now - _epoch(record.start) > START_GRACE_S:
        return _iso(now), f"{liveness.why} {START_GRACE_S:.0f} s after it was launched"
    return None  # starting: its lease comes first


def close_dead_attempts(node_dir: NodeDir, now: float | None = None) -> list[AttemptRecord]:
    """End every local attempt record of `node_dir` that is RUNNING but whose process is gone (see the module
    docstring) as KILLED; returns the records it closed."""
    now = time.time() if now is None else now
    attempts = list_attempts(node_dir)
    closed = []
    for i, record in enumerate(attempts):
        if record.state != "RUNNING" or record.executor != "local":
            continue
        found = dead(node_dir, record, attempts[i + 1] if i + 1 < len(attempts) else None, now)
        if found is None:
            continue
        record.end, record.state = found[0], KILLED
        record.message = (
            f"its process ended without recording how ({found[1]}): killed by SIGKILL (kill -9, the out-of-memory "
            "killer) or its machine stopped, while no scheduler watched it; the signal is unknown"
        )
        record.write(node_dir)
        closed.append(record)
    return closed
