"""Node status, attempt records and the heartbeat lease: the files a node's state is read from.

State machine of a node: PENDING -> RUNNING -> SUCCEEDED | FAILED; a node whose dependency
failed is DEP_FAILED. RUNNING is what the node said last; whether its process still lives is
one rule, `lease_liveness`, used by `trinity status`, `explain` and `resume` alike. A RUNNING node
is live only if its lease.json parses, its heartbeat is neither older than STALE_PERIODS periods
nor dated more than CLOCK_SKEW_S in the future, and, on this host, its pid is a running process
that started when the lease says (so a reused pid is not mistaken for the node). Anything else
means the node died without saying so.

Process identity comes from /proc/PID/stat (start time in clock ticks since boot, and the zombie
state), which is what psutil reads on Linux; psutil is not a dependency of trinity, and the
executors (local, Slurm, torchrun) run on Linux. Without /proc only the pid's existence is checked.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trinity.run.layout import NodeDir, atomic_write_json, read_json
from trinity.spec.execution import WatchdogSpec

State = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "DEP_FAILED"]
STALE_PERIODS = 3
"""A heartbeat older than this many periods means the node died."""
CLOCK_SKEW_S = 30.0
"""How far in the future a heartbeat may be dated (another host's clock ahead of ours) and still be trusted."""
MAX_PERIOD_S = 24 * 3600.0
"""A lease whose period is longer than this is not trusted (it would count as live for days)."""


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
    reused_from: str | None = None
    """The shared store's entry (execution.store) whose outputs this attempt took instead of running the body."""
    message: str = ""
    provenance: dict[str, Any] | None = None
    """Code, libraries and hosts the attempt ran on (trinity.execute.provenance); None: it never reached its body."""

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


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot: /proc/PID/stat field 22), or None when there is
    no such process, or only its zombie (it exited and nobody collected its exit status yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` is a running process of this host and, given its `start` (process_start), the same one."""
    if pid <= 0:
        return False  # os.kill(0, ...) would address our own process group, not a process
    if Path("/proc/self/stat").is_file():
        now = process_start(pid)
        return now is not None and (start is None or now == start)
    try:  # no /proc: the pid exists (it may be a zombie or a reused pid)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProcessRef(BaseModel):
    """A process on the lease's host: its pid and start time (process_start), which tell a reused pid apart."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")
    pid: int = Field(gt=0)
    start: int | None = None


class Lease(ProcessRef):
    """lease.json: rewritten by the node's process every `period_s` while it runs."""

    host: str = Field(min_length=1)
    time: float = Field(allow_inf_nan=False)
    """When it was written (seconds since the epoch, the node host's clock)."""
    period_s: float = Field(gt=0, le=MAX_PERIOD_S, allow_inf_nan=False)
    attempt: int | None = None
    scheduler: ProcessRef | None = None
    """The local scheduler the node watches (it stops at a checkpoint once that is gone); None: detached."""
    step: int | None = None
    """The last optimizer step this attempt completed (None: none yet, or a node that does not step)."""
    step_time: float | None = Field(None, allow_inf_nan=False)
    """When that step completed (before the first: when the attempt began); None: the node does not step."""
    stall_after_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Seconds without a completed step after which the node counts as stalled (execution.watchdog)."""


def lease_stall(lease: Lease, now: float | None = None) -> str | None:
    """Why the node holding `lease` is stalled (its steps stopped advancing), or None if it is not.

    A node that does not report steps (step_time None) is never stalled. Times are the node host's clock,
    as the lease's own `time` is: a stall is measured from the last step to the last heartbeat when the
    lease is judged from another host, so clock skew between hosts does not count (on its own host, to now).
    """
    if lease.step_time is None or lease.stall_after_s is None:
        return None
    at = time.time() if now is None else now
    if lease.host != socket.gethostname():
        at = lease.time
    idle = at - lease.step_time
    if idle <= lease.stall_after_s:
        return None
    since = "since the attempt began" if lease.step is None else f"since step {lease.step}"
    return f"no step for {idle:.0f} s {since} (allowed {lease.stall_after_s:.0f} s)"


def own_process() -> ProcessRef:
    return ProcessRef(pid=os.getpid(), start=process_start(os.getpid()))


STEP_TIMES_KEPT = 1000
"""The median step time (the default stall allowance) is over this many most recent steps."""


class StepProgress:
    """The steps an attempt completed, for its heartbeat lease: written by the training loop after each
    optimizer step (`step_done`), read by the heartbeat thread (`snapshot`); thread-safe.

    `begin()` says the node steps (a training loop is being built): from then on the lease carries
    step_time and the stall allowance: first_step_s until the first step completes (its warm-up), then the
    watchdog's `stall_after_s` when given, else max(min_stall_s, stall_factor x the median step time so far).
    """

    def __init__(self, watchdog: WatchdogSpec | None = None) -> None:
        self.watchdog = watchdog if watchdog is not None else WatchdogSpec()
        self._lock = threading.Lock()
        self._began: float | None = None
        self._step: int | None = None
        self._step_time: float | None = None
        self._seconds: collections.deque[float] = collections.deque(maxlen=STEP_TIMES_KEPT)

    def begin(self) -> None:
        """The node steps: its stall clock starts now (if not started already)."""
        with self._lock:
            if self._began is None:
                self._began = time.time()

    def step_done(self, step: int, seconds: float) -> None:
        """Optimizer step `step` completed, having taken `seconds`."""
        with self._lock:
            if self._began is None:
                self._began = time.time()
            self._step, self._step_time = step, time.time()
            self._seconds.append(seconds)

    def allowance(self) -> float:
        """The stall allowance now (see the class docstring)."""
        with self._lock:
            seconds = sorted(self._seconds)
        dog = self.watchdog
        if not seconds:
            return dog.first_step_s
        if dog.stall_after_s is not None:
            return dog.stall_after_s
        return max(dog.min_stall_s, dog.stall_factor * seconds[len(seconds) // 2])

    def snapshot(self) -> tuple[int | None, float | None, float | None]:
        """(last step, when it completed or when the steps began, allowance); all None if the node does not step."""
        with self._lock:
            began, step, step_time = self._began, self._step, self._step_time
        if began is None:
            return None, None, None
        return step, step_time if step_time is not None else began, self.allowance()


class Heartbeat:
    """Rewrites lease.json every `period_s` from a daemon thread while the node runs, with the steps of
    `progress` (if given) for the stall rule (`lease_stall`)."""

    def __init__(
        self,
        node_dir: NodeDir,
        attempt: int,
        period_s: float,
        scheduler: ProcessRef | None = None,
        progress: StepProgress | None = None,
    ) -> None:
        self.node_dir, self.attempt, self.period_s, self.scheduler = node_dir, attempt, period_s, scheduler
        self.progress = progress
        self._me = own_process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trinity-heartbeat", daemon=True)

    def _beat(self) -> None:
        step, step_time, stall_after_s = self.progress.snapshot() if self.progress else (None, None, None)
        lease = Lease(
            pid=self._me.pid,
            start=self._me.start,
            host=socket.gethostname(),
            attempt=self.attempt,
            time=time.time(),
            period_s=self.period_s,
            scheduler=self.scheduler,
            step=step,
            step_time=step_time,
            stall_after_s=stall_after_s,
        )
        atomic_write_json(self.node_dir.lease, lease.model_dump(mode="json"))

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


@dataclass(frozen=True)
class Liveness:
    """What a node's lease says about its process (see the module docstring for the rule)."""

    live: bool
    why: str
    """Why it is live ('heartbeat 1.2 s ago from pid 4242 on host-a') or not ('no heartbeat for 412 s')."""
    lease: Lease | None = None
    orphaned: bool = False
    """Live, but the scheduler it watches (same host) is gone: it is stopping at a checkpoint by itself."""


def lease_liveness(node_dir: NodeDir, attempt: int | None = None, now: float | None = None) -> Liveness:
    """Whether the process holding `node_dir`'s lease (of `attempt`, if given) is alive. Never raises."""
    try:
        text = node_dir.lease.read_text()
    except FileNotFoundError:
        return Liveness(False, "no heartbeat lease")
    except (OSError, UnicodeDecodeError) as exc:
        return Liveness(False, f"lease.json unreadable ({exc})")
    try:
        lease = Lease.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return Liveness(False, f"damaged lease.json ({where + ': ' if where else ''}{first['msg']})")
    if attempt is not None and lease.attempt is not None and lease.attempt != attempt:
        return Liveness(False, f"the lease is attempt {lease.attempt}'s, not attempt {attempt}'s", lease)
    age = (time.time() if now is None else now) - lease.time
    if age < -CLOCK_SKEW_S:
        return Liveness(False, f"heartbeat dated {-age:.0f} s in the future on {lease.host}: not trusted", lease)
    if age > STALE_PERIODS * lease.period_s:
        return Liveness(False, f"no heartbeat for {age:.0f} s (period {lease.period_s:g} s)", lease)
    where = f"pid {lease.pid} on {lease.host}"
    if lease.host != socket.gethostname():
        return Liveness(True, f"heartbeat {max(age, 0):.1f} s ago from {where}", lease)
    if not process_alive(lease.pid, lease.start):
        gone = "was reused by another process" if process_alive(lease.pid) else "is gone"
        return Liveness(False, f"its process ({where}) {gone}", lease)
    if lease.scheduler is not None and not process_alive(lease.scheduler.pid, lease.scheduler.start):
        why = f"{where}: its scheduler (pid {lease.scheduler.pid}) is gone, so it is stopping at a checkpoint"
        return Liveness(True, why, lease, orphaned=True)
    return Liveness(True, f"heartbeat {max(age, 0):.1f} s ago from {where}", lease)


def lease_is_stale(node_dir: NodeDir, now: float | None = None) -> bool:
    """True if the node holds no live lease (see `lease_liveness`)."""
    return not lease_liveness(node_dir, now=now).live
