"""Run one node attempt in this process: `python -m trinity.execute.attempt RUN NODE --attempt N`.

This is what every executor launches. It marks the node RUNNING, keeps a heartbeat lease, runs
the node's body, verifies its outputs and only then writes SUCCEEDED. A failure is written as
FAILED with one readable message (the traceback goes to the attempt's log). SIGTERM asks the
body to stop: training nodes commit a checkpoint at the next optimizer step and exit. A body that
raises RestartRequested (a loss-spike rollback) ends the attempt as RESTART with exit status
EXIT_RESTART, and its executor starts a new attempt at once, which resumes from the last checkpoint.

A training node with several ranks (parallel.nodes x parallel.gpus_per_node) is this module run
once per rank, by torchrun locally or by one Slurm task per rank; the rendezvous comes from the
launcher's environment (trinity.distributed.env). Every rank runs the body; rank 0 alone writes
the status, the attempt record, the heartbeat and progress, and verifies the outputs. Each rank
records how it ended (trinity.run.ranks) before it leaves the process group; rank 0 ends the
attempt as the earliest rank that did not succeed, with that rank's message.

A node never outlives the local scheduler that launched it: the scheduler passes its pid and start
time in TRINITY_SCHEDULER_PID / TRINITY_SCHEDULER_START, and `SchedulerWatch` turns its end (even
by SIGKILL) into the same SIGTERM, so the node stops at a committed checkpoint and says why. Nodes
of `trinity run --detach` and of Slurm jobs get no such variables and watch nothing.

With `execution.store` set (trinity.run.shared_store), a single-process attempt first claims its
identity in the shared store, under its own heartbeat lease, before the body runs: a committed entry
is reused (linked, SUCCEEDED without running the body), another live run producing it is waited for
(then its entry is reused), a stale producer's lease is taken over. Every attempt that SUCCEEDED
publishes its outputs there (rank 0, after verify); a failure to publish is a warning and an event,
never a failed node. Known gap: a multi-rank attempt does not claim (torch.distributed would have to
agree on it): two runs may both train one identity at once; the second publish is dropped.

The attempt's log (nodes/<id>/logs/attempt-NNNN.log, the process's stdout and stderr as its executor
opened them) is written for a person: a line when the attempt starts, its training progress (at most
every LOG_PROGRESS_EVERY_S, and the last step), what the body prints, a traceback when it fails, and
a line saying how it ended. Several ranks write one log: each line of rank r is prefixed `[rank r] `.
A stop requested by `trinity cancel` (it leaves `cancel_marker` before its SIGTERM) says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from trinity.distributed.env import destroy_distributed, dist_env, init_distributed
from trinity.errors import NodeFailure, RestartRequested, StopRequested, TrinityError
from trinity.execute.provenance import collect, gather_hosts
from trinity.graph.kinds import node_world_size
from trinity.nodes.context import NodeContext
from trinity.nodes.registry import node_body
from trinity.run.graph import RunGraph
from trinity.run.layout import NodeDir, RunDir, read_json
from trinity.run.ranks import RankEnd, deciding_end, read_rank_ends, write_rank_end
from trinity.run.shared_store import Claim, LeaseOwner, SharedStore, StoreLease, claim, link_entry
from trinity.run.status import AttemptRecord, Heartbeat, NodeStatus, ProcessRef, now_iso, process_alive

EXIT_FAILED = 1
EXIT_STOPPED = 3
EXIT_RESTART = 4
"""The attempt ended asking to be started again at once from its last committed checkpoint (RestartRequested)."""
SCHEDULER_PID_ENV = "TRINITY_SCHEDULER_PID"
SCHEDULER_START_ENV = "TRINITY_SCHEDULER_START"
WATCH_PERIOD_S = 1.0
"""How often a node checks that its scheduler is still there (the parent-death signal is immediate)."""
PR_SET_PDEATHSIG = 1
LOG_PROGRESS_EVERY_S = 10.0
"""A training node's progress goes to its log at most this often (the first report and the last step always)."""


@dataclass(frozen=True)
class Outcome:
    state: str
    """SUCCEEDED, FAILED, STOPPED or RESTART."""
    message: str
    exit_code: int
    time: float = field(default_factory=time.time)


def cancel_marker(node_dir: NodeDir, attempt: int) -> Path:
    """The file `trinity cancel` writes before it signals the attempt, so that the attempt's stop says why."""
    return node_dir.attempts / f"{attempt:04d}.cancel"


class RankPrefixed(io.TextIOBase):
    """A text stream that writes each whole line to `stream` with `prefix` in front, flushed at once.

    Every rank of a node appends to the same log file; a line written whole in one write() is not
    interleaved with another rank's (O_APPEND), and the prefix says whose it is."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        super().__init__()
        self.stream, self.prefix, self._partial = stream, prefix, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.stream.write(f"{self.prefix}{self._partial}")
            self._partial = ""
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return False


class ProgressLog:
    """Writes a training node's progress reports (NodeContext.progress) to the log as lines a person reads:
    the first at once, then at most every `every_s`, and the last step."""

    def __init__(self, node_id: str, every_s: float = LOG_PROGRESS_EVERY_S) -> None:
        self.node_id, self.every_s, self._last = node_id, every_s, -math.inf

    def __call__(self, values: dict[str, Any]) -> None:
        step, total = values.get("step"), values.get("total_steps")
        now = time.monotonic()
        if step is None or (now - self._last < self.every_s and step != total):
            return
        self._last = now
        parts = [f"step {step}" + (f"/{total}" if total is not None else "")]
        parts += [f"{key} {values[key]}" for key in ("loss", "tokens_per_s", "tokens") if values.get(key) is not None]
        print(f"trinity: {self.node_id}: " + ", ".join(parts), flush=True)


class SchedulerWatch:
    """Sends this process SIGTERM (the executor's stop request) once its local scheduler is gone.

    Two ways, either enough. The kernel's parent-death signal (Linux prctl PR_SET_PDEATHSIG), set
    only when the scheduler is this process's parent (a single-process node; a torchrun rank's parent
    is torchrun): it fires when the scheduler's thread that launched us ends, which is the
    scheduler's main thread, so its exit. And a daemon thread that checks every WATCH_PERIOD_S that
    the scheduler's pid is still the process that started then, for any rank under any parent (it
    also catches a scheduler that died before the signal was set).
    """

    def __init__(self, scheduler: ProcessRef, on_gone: Callable[[], None]) -> None:
        self.scheduler, self.on_gone = scheduler, on_gone
        self._child = os.getppid() == scheduler.pid
        self._thread = threading.Thread(target=self._run, name="trinity-scheduler-watch", daemon=True)

    @classmethod
    def from_env(cls, on_gone: Callable[[], None]) -> SchedulerWatch | None:
        pid, start = os.environ.get(SCHEDULER_PID_ENV), os.environ.get(SCHEDULER_START_ENV)
        if not pid:
            return None
        return cls(ProcessRef(pid=int(pid), start=int(start) if start else None), on_gone)

    def gone(self) -> bool:
        # A child is reparented before the parent-death signal is sent, and before its parent is a zombie.
        orphaned = self._child and os.getppid() != self.scheduler.pid
        return orphaned or not process_alive(self.scheduler.pid, self.scheduler.start)

    @property
    def reason(self) -> str:
        return f"stopped: its scheduler (pid {self.scheduler.pid}) is gone"

    def start(self) -> None:
        if self._thread.is_alive():
            return  # started already (before a wait for the shared store)
        if self._child and sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        self._thread.start()

    def _run(self) -> None:
        while not self.gone():
            time.sleep(WATCH_PERIOD_S)
        self.on_gone()


def run_attempt(run: RunDir, node_id: str, attempt: int, executor: str) -> int:
    """Run this process's part of the attempt; returns the process exit status."""
    graph = RunGraph.load(run)
    node = graph[node_id]
    meta = read_json(run.run_json)
    launched = dist_env()
    ctx = NodeContext(
        graph=graph,
        node=node,
        spec=graph.spec(node),
        base_dir=Path(meta["base_dir"]),
        attempt=attempt,
        run_id=meta["run_id"],
        executor=executor,
        rank=launched.rank,
        world_size=launched.world_size,
    )
    if ctx.world_size > 1:  # one log for every rank: each line says whose it is
        sys.stdout = RankPrefixed(sys.stdout, f"[rank {ctx.rank}] ")
        sys.stderr = RankPrefixed(sys.stderr, f"[rank {ctx.rank}] ")
        where = f"rank {ctx.rank} of {ctx.world_size} on {socket.gethostname()} (pid {os.getpid()})"
    else:
        where = f"on {socket.gethostname()} (pid {os.getpid()})"
    print(
        f"trinity: {node_id} attempt {attempt}: {node.kind} node, identity {node.identity[:12]}, "
        f"{executor} executor, {where}, started {now_iso()}",
        flush=True,
    )
    ctx.on_progress = ProgressLog(node_id)
    # Only a local scheduler is watched: a Slurm job's environment is the submitter's, from any host.
    watch = SchedulerWatch.from_env(lambda: os.kill(os.getpid(), signal.SIGTERM)) if executor == "local" else None
    if watch is not None and watch.gone():  # a `trinity resume` may own the node already: leave its files be
        message = f"its scheduler (pid {watch.scheduler.pid}) was gone before it started"
        print(f"trinity: {node_id} attempt {attempt}: {message}", file=sys.stderr)
        if ctx.is_primary and ctx.dir.attempt_record(attempt).is_file():
            AttemptRecord.read(ctx.dir, attempt).finish(ctx.dir, "STOPPED", EXIT_STOPPED, None, message)
        return EXIT_STOPPED
    # The lease first: whoever reads RUNNING finds a lease (of this attempt) to judge it by.
    scheduler = watch.scheduler if watch else None
    heartbeat = Heartbeat(ctx.dir, attempt, ctx.spec.execution.heartbeat_s, scheduler, progress=ctx.steps)
    with heartbeat if ctx.is_primary else contextlib.nullcontext():
        if ctx.is_primary:
            _start_attempt_record(ctx)
            NodeStatus(
                state="RUNNING",
                identity=node.identity,
                attempt=attempt,
                message=f"running attempt {attempt}",
                progress={},
            ).write(ctx.dir)

        def on_term(signum: int, frame: FrameType | None) -> None:
            if watch is not None and watch.gone():
                reason = watch.reason
            elif cancel_marker(ctx.dir, attempt).is_file():
                reason = "cancelled with `trinity cancel`"
            else:
                reason = "stopped on request"
            ctx.stop_event.set(reason)
            if not ctx.checks_stop:
                raise StopRequested()

        signal.signal(signal.SIGTERM, on_term)
        if executor == "slurm":  # Slurm signals every process of the job: preemption asks for a stop, as SIGTERM
            from trinity.execute.slurm_job import preemption_signal

            signal.signal(preemption_signal(), on_term)
        store = _store(run) if ctx.is_primary else None
        lease: StoreLease | None = None
        try:
            if store is not None and ctx.world_size == 1 and node_world_size(ctx.kind, ctx.spec) == 1:
                claimed = _claim(ctx, store, run, watch)
                if claimed.entry is not None and _reuse(ctx, claimed):
                    return 0
                if claimed.stopped:
                    signal.signal(signal.SIGTERM, lambda signum, frame: ctx.stop_event.set())
                    _fail(ctx, f"stopped while waiting for {claimed.waited_for} to publish it", "STOPPED")
                    return EXIT_STOPPED
                lease = claimed.lease
            _unshare_outputs(ctx)
            outcome = _run_body(ctx, watch)
            signal.signal(signal.SIGTERM, lambda signum, frame: ctx.stop_event.set())  # the end is being written
            return _report(ctx, outcome, store, run.root)
        finally:
            if lease is not None:
                lease.release()  # after the publish (or the failure): a waiting run reuses or takes over
            destroy_distributed()  # after the report: a peer that sees us leave finds our reason on disk


def _store(run: RunDir) -> SharedStore | None:
    from trinity.execute.run import run_store  # here: it loads the graph compiler

    return run_store(run)


def _claim(ctx: NodeContext, store: SharedStore, run: RunDir, watch: SchedulerWatch | None) -> Claim:
    """Claim the node's identity in the shared store (see the module docstring); a stop ends a wait."""
    if watch is not None:
        watch.start()  # a scheduler gone while we wait stops the wait too

    def waiting(message: str) -> None:
        print(f"trinity: {ctx.node_id}: {message}", flush=True)
        status = NodeStatus.read(ctx.dir)
        status.message = message
        status.write(ctx.dir)

    def problem(message: str) -> None:
        print(f"trinity: {ctx.node_id}: {message}", file=sys.stderr, flush=True)

    owner = LeaseOwner.me(run.root, ctx.node_id, ctx.spec.execution.heartbeat_s)
    try:
        return claim(
            store,
            ctx.node.identity,
            owner,
            stop=ctx.stop_event.is_set,
            on_wait=waiting,
            poll_s=min(1.0, ctx.spec.execution.heartbeat_s),
            on_problem=problem,
        )
    except StopRequested:
        return Claim(stopped=True, waited_for="another run")


def _reuse(ctx: NodeContext, claimed: Claim) -> bool:
    """Take the claimed entry's outputs instead of running the body; False (the body runs) if they cannot be linked."""
    from trinity.execute.run import record_reuse

    assert claimed.entry is not None
    try:
        placed = link_entry(claimed.entry, ctx.dir)
    except (OSError, ValueError, KeyError, TrinityError) as exc:
        print(
            f"trinity: {ctx.node_id}: the store entry {claimed.entry} could not be linked ({exc}); running it",
            file=sys.stderr,
        )
        return False
    record = AttemptRecord.read(ctx.dir, ctx.attempt)
    message = record_reuse(ctx.dir, ctx.node_id, ctx.run_id, record, placed, claimed.waited_for or "")
    print(f"trinity: {ctx.node_id} attempt {ctx.attempt}: {message}", flush=True)
    return True


def _unshare_outputs(ctx: NodeContext) -> None:
    """Before the body writes outputs/: drop files shared (hard-linked) with the store, so that nothing written in
    place reaches the store's copy (a node reused once and now run again)."""
    outputs = ctx.dir.outputs
    if ctx.is_primary and outputs.is_dir() and any(p.is_file() and p.stat().st_nlink > 1 for p in outputs.rglob("*")):
        shutil.rmtree(outputs)


def _publish(ctx: NodeContext, store: SharedStore, run_root: Path) -> None:
    """Publish a SUCCEEDED node's outputs in the shared store; any failure is a warning and an event only."""
    from trinity.execute.run import store_event

    try:
        placed = store.publish(
            ctx.dir,
            identity=ctx.node.identity,
            kind=ctx.kind,
            node_id=ctx.node_id,
            run_root=run_root,
            run_id=ctx.run_id,
        )
    except Exception as exc:  # never fails the node
        message = f"warning: publishing to the store {store.root} failed ({type(exc).__name__}: {exc})"
        print(f"trinity: {ctx.node_id}: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            store_event(ctx.dir, ctx.node_id, ctx.run_id, ctx.attempt, "publish_failed", message)
        return
    if placed.dropped:
        message = f"not published: {placed.path} was committed by another run first"
    else:
        message = f"published to {placed.path}{placed.note}"
    print(f"trinity: {ctx.node_id}: {message}", flush=True)
    with contextlib.suppress(Exception):
        store_event(ctx.dir, ctx.node_id, ctx.run_id, ctx.attempt, "published", message, entry=str(placed.path))


def _run_body(ctx: NodeContext, watch: SchedulerWatch | None = None) -> Outcome:
    """Watch the scheduler (if any), join the ranks (if several), run the body on every rank, verify on rank 0."""
    try:
        if watch is not None:
            watch.start()
        expected = node_world_size(ctx.kind, ctx.spec)
        if ctx.world_size != expected:
            raise NodeFailure(_world_size_mismatch(ctx, expected))
        if expected > 1:
            init_distributed()
        _record_provenance(ctx)
        kind = node_body(ctx.node.kind)
        kind.run(ctx)
        if ctx.stop_event.is_set() and ctx.checks_stop and not _finished(ctx):
            raise StopRequested()
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank's part of the outputs is written before rank 0 verifies them
        if ctx.is_primary:
            kind.verify(ctx)
    except StopRequested:
        # Under torchrun the stop is agreed by every rank: rank 0 may stop because a peer's watch saw
        # the scheduler gone before its own did, so it asks its watch (which checks at once) too.
        gone = watch is not None and watch.gone()
        reason = ctx.stop_event.reason or (watch.reason if gone and watch is not None else "stopped on request")
        return Outcome("STOPPED", reason + _checkpoint_note(ctx), EXIT_STOPPED)
    except RestartRequested as exc:  # every rank raises it together (a loss-spike rollback is decided globally)
        return Outcome("RESTART", str(exc), EXIT_RESTART)
    except NodeFailure as exc:
        return Outcome("FAILED", str(exc), EXIT_FAILED)
    except Exception as exc:
        traceback.print_exc()
        where = ctx.dir.log_file(ctx.attempt)
        return Outcome("FAILED", f"{type(exc).__name__}: {exc} (traceback in {where})", EXIT_FAILED)
    return Outcome("SUCCEEDED", "", 0)


def _world_size_mismatch(ctx: NodeContext, expected: int) -> str:
    par = ctx.spec.parallel
    if expected > 1:
        wanted = f"{expected} processes (parallel.nodes x parallel.gpus_per_node = {par.nodes} x {par.gpus_per_node})"
    else:
        wanted = f"1 process (a {ctx.kind} node is not distributed)"
    return (
        f"{ctx.node_id} runs as {wanted}, but was launched as {ctx.world_size}; "
        "launch it through `trinity run` / `trinity resume`, which start the right number"
    )


def _report(ctx: NodeContext, outcome: Outcome, store: SharedStore | None = None, run_root: Path | None = None) -> int:
    """Record how this rank ended; on rank 0, end the attempt (the deciding rank's state and message)."""
    if ctx.world_size > 1:
        write_rank_end(
            ctx.dir,
            ctx.attempt,
            RankEnd(ctx.rank, outcome.state, outcome.exit_code, outcome.message, outcome.time),
        )
    if not ctx.is_primary:
        if outcome.state != "SUCCEEDED":
            print(f"trinity: {ctx.node_id} attempt {ctx.attempt} rank {ctx.rank}: {outcome.message}", file=sys.stderr)
        return outcome.exit_code
    if ctx.world_size > 1:
        own = RankEnd(0, outcome.state, outcome.exit_code, outcome.message, outcome.time)
        ends = [own, *(e for r, e in read_rank_ends(ctx.dir, ctx.attempt).items() if r != 0)]
        cause = deciding_end(ends)
        if cause is not None and cause.rank != 0 and not (cause.state == own.state in ("STOPPED", "RESTART")):
            outcome = Outcome(cause.state, f"rank {cause.rank}: {cause.message}", cause.exit_code, cause.time)
    if outcome.state == "SUCCEEDED":
        AttemptRecord.read(ctx.dir, ctx.attempt).finish(ctx.dir, "SUCCEEDED", 0, None, "")
        print(f"trinity: {ctx.node_id} attempt {ctx.attempt}: SUCCEEDED at {now_iso()}", flush=True)
        status = NodeStatus.read(ctx.dir)
        status.state, status.message = "SUCCEEDED", ""
        status.write(ctx.dir)
        if store is not None and run_root is not None:
            _publish(ctx, store, run_root)
        return 0
    _fail(ctx, outcome.message, outcome.state)
    return outcome.exit_code


def _finished(ctx: NodeContext) -> bool:
    return (ctx.dir.outputs / "final.json").is_file()


def _start_attempt_record(ctx: NodeContext) -> None:
    path = ctx.dir.attempt_record(ctx.attempt)
    if path.is_file():
        record = AttemptRecord.read(ctx.dir, ctx.attempt)
    else:
        record = AttemptRecord(attempt=ctx.attempt, executor=ctx.executor, identity=ctx.node.identity)
    record.pid = os.getpid()
    record.write(ctx.dir)


def _record_provenance(ctx: NodeContext) -> None:
    """Every rank gives its host name; rank 0 writes the code, libraries and hosts of this attempt into its record
    (trinity.execute.provenance) before the body runs, so that even an attempt that fails early says what it ran."""
    hosts = gather_hosts(ctx.world_size)
    if ctx.is_primary:
        record = AttemptRecord.read(ctx.dir, ctx.attempt)
        record.provenance = collect(hosts=hosts)
        record.write(ctx.dir)


def _checkpoint_note(ctx: NodeContext) -> str:
    from trinity.nodes.checkpoints import last_committed_step

    step = last_committed_step(ctx.dir)
    return f"; last committed checkpoint at step {step}" if step is not None else ""


def _fail(ctx: NodeContext, message: str, state: str) -> None:
    print(f"trinity: {ctx.node_id} attempt {ctx.attempt}: {state} at {now_iso()}: {message}", file=sys.stderr)
    # The body may have updated the record (resumed_from_step): finish what is on disk.
    AttemptRecord.read(ctx.dir, ctx.attempt).finish(ctx.dir, state, None, None, message)
    status = NodeStatus.read(ctx.dir)
    status.state, status.message = ("PENDING" if state == "RESTART" else "FAILED"), message  # RESTART: relaunched
    status.write(ctx.dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("node_id")
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--executor", default="local")
    args = parser.parse_args(argv)
    try:
        return run_attempt(RunDir(args.run_dir.resolve()), args.node_id, args.attempt, args.executor)
    except TrinityError as exc:  # a damaged or hostile run directory: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
