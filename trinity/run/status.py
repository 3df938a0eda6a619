"""Node status, attempt records and the heartbeat lease: the files a node's state is read from.

State machine of a node: PENDING -> RUNNING -> SUCCEEDED | FAILED; a node whose dependency
failed is DEP_FAILED. RUNNING with a stale lease (no heartbeat for 3 periods, or a dead pid on
this host) means the node died without saying so.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from trinity.run.layout import NodeDir, atomic_write_json, read_json

State = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "DEP_FAILED"]
STALE_PERIODS = 3


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class NodeStatus:
    """Contents of status.json."""

    state: State = "PENDING"
    identity: str = ""
    attempt: int = 0
    """The latest attempt number (0: never tried)."""
    message: str = ""
    """Why it failed, or what it is doing."""
    updated: str = field(default_factory=now_iso)
    progress: dict[str, Any] = field(default_factory=dict)
    """Training progress: step, total_steps, loss, tokens_per_s, tokens."""

    @classmethod
    def read(cls, node_dir: NodeDir) -> NodeStatus:
        if not node_dir.status.is_file():
            return cls()
        data = read_json(node_dir.status)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def write(self, node_dir: NodeDir) -> None:
        self.updated = now_iso()
        atomic_write_json(node_dir.status, asdict(self))


@dataclass
class AttemptRecord:
    """One try of a node: attempts/NNNN.json."""

    attempt: int
    executor: str
    identity: str
    start: str = field(default_factory=now_iso)
    end: str | None = None
    state: str = "RUNNING"
    host: str = field(default_factory=socket.gethostname)
    pid: int | None = None
    job_id: str | None = None
    array_index: int | None = None
    depends_on: str | None = None
    """The Slurm dependency the job was submitted with (e.g. 'afterok:41,aftercorr:40')."""
    exit_code: int | None = None
    signal: int | None = None
    resumed_from_step: int | None = None
    message: str = ""

    def write(self, node_dir: NodeDir) -> None:
        atomic_write_json(node_dir.attempt_record(self.attempt), asdict(self))

    @classmethod
    def read(cls, node_dir: NodeDir, attempt: int) -> AttemptRecord:
        data = read_json(node_dir.attempt_record(attempt))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def finish(self, node_dir: NodeDir, state: str, exit_code: int | None, sig: int | None, message: str) -> None:
        self.end, self.state, self.exit_code, self.signal, self.message = now_iso(), state, exit_code, sig, message
        self.write(node_dir)


def list_attempts(node_dir: NodeDir) -> list[AttemptRecord]:
    if not node_dir.attempts.is_dir():
        return []
    numbers = sorted(int(p.stem) for p in node_dir.attempts.glob("[0-9]*.json"))
    return [AttemptRecord.read(node_dir, n) for n in numbers]


def next_attempt(node_dir: NodeDir) -> int:
    attempts = list_attempts(node_dir)
    return attempts[-1].attempt + 1 if attempts else 1


class Heartbeat:
    """Rewrites lease.json every `period_s` from a daemon thread while the node runs."""

    def __init__(self, node_dir: NodeDir, attempt: int, period_s: float) -> None:
        self.node_dir, self.attempt, self.period_s = node_dir, attempt, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trinity-heartbeat", daemon=True)

    def _beat(self) -> None:
        atomic_write_json(
            self.node_dir.lease,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "attempt": self.attempt,
                "time": time.time(),
                "period_s": self.period_s,
            },
        )

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._beat()

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def lease_is_stale(node_dir: NodeDir, now: float | None = None) -> bool:
    """True if the node holds no lease, or its heartbeat stopped, or its process is gone (same host)."""
    if not node_dir.lease.is_file():
        return True
    lease = read_json(node_dir.lease)
    age = (now or time.time()) - float(lease["time"])
    if age > STALE_PERIODS * float(lease.get("period_s", 30)):
        return True
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False
