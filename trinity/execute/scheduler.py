"""The scheduler loop: run the nodes that must run, in dependency order, on an executor.

A node starts when all its dependencies SUCCEEDED. When one fails, everything downstream of it
is DEP_FAILED (and re-runs on resume). SIGINT (Ctrl-C), SIGTERM (a batch system, `kill`) and SIGHUP
(a closed terminal) all ask running nodes to stop: a training node commits a checkpoint at its next
step and exits; the run can be resumed from there. The scheduler then raises `SchedulerStopped`,
whose exit status is 128 + the signal's number, the shell's convention for "ended by that signal"
(130, 143, 129). The first Ctrl-C says at once which nodes are stopping and what a second one does;
a second Ctrl-C kills the nodes still stopping (SIGKILL: they lose the steps since their last committed
checkpoint, where resume continues), ends their attempts as KILLED and names them. A signal ignored
when the scheduler starts stays ignored: `nohup trinity run ...` survives a hangup. With `detach`
(trinity run --detach) a signal ends the scheduler alone and the running nodes carry on.

`jobs` counts processes: a training node of N ranks occupies N of them. A node larger than
`jobs` still runs, alone, once nothing else does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

import networkx as nx

from trinity.errors import Interrupted
from trinity.execute import during
from trinity.execute.attempt import EXIT_RESTART
from trinity.execute.closeout import close_dead_attempts
from trinity.execute.executor import Executor, Finished, Handle
from trinity.execute.run import Decision, mark_pending, supersede
from trinity.execute.watchdog import Stall, Watchdog, end_stalled
from trinity.graph.compile import nodes_in_order
from trinity.nodes.checkpoints import last_committed_step
from trinity.run.layout import RunDir
from trinity.run.status import AttemptRecord, NodeStatus, next_attempt

POLL_S = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SchedulerStopped(Interrupted):
    """The scheduler was stopped by a signal: the running nodes were stopped at a checkpoint (or, detached,
    left running: `left_running`). `message` says what happened and what to do next."""

    def __init__(self, signum: int, left_running: list[str], message: str) -> None:
        super().__init__(message)
        self.signum, self.left_running, self.message = signum, left_running, message

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopSignals:
    """While the scheduler runs, records the first of STOP_SIGNALS, and a later Ctrl-C as `forced`, for the
    loop to act on (a handler that raised could leave a launch, a kill or a status write half done, and
    claim nodes stopped that still train). Main thread only, as Python signals are."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.forced = False
        """A Ctrl-C after the first stop signal: kill the nodes still stopping."""
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT:
            self.forced = True

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                previous = signal.getsignal(sig)
                if previous != signal.SIG_IGN:
                    self._previous[sig] = previous
                    signal.signal(sig, self._record)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]


def execute(
    run: RunDir,
    graph: nx.DiGraph,
    decisions: dict[str, Decision],
    executor: Executor,
    jobs: int = 1,
    on_tick: Callable[[], None] = lambda: None,
    detach: bool = False,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, str]:
    """Run every node whose decision is 'run'; returns the final state of each node. Raises SchedulerStopped
    on SIGINT, SIGTERM or SIGHUP once the running nodes stopped (with `detach`: at once, leaving them).
    `say` shows the person at the terminal a line at once (what a stop signal does while it waits)."""
    order = [n for n in nodes_in_order(graph) if decisions[n.id].action == "run"]
    executor.check([n.id for n in order])
    for node in order:
        close_dead_attempts(run.node(node.id))  # an attempt killed while nobody watched: KILLED, not RUNNING
        supersede(run, node)
        mark_pending(run, node)
    pending = [n.id for n in order]
    running: dict[str, Handle] = {}
    with _StopSignals() as signals:
        _loop(run, graph, executor, jobs, on_tick, pending, running, signals)
        if signals.received is not None:
            raise _stopped(run, graph, running, on_tick, signals, detach, say)
    on_tick()
    return {n: NodeStatus.read(run.node(n)).state for n in graph.nodes}


def _loop(
    run: RunDir,
    graph: nx.DiGraph,
    executor: Executor,
    jobs: int,
    on_tick: Callable[[], None],
    pending: list[str],
    running: dict[str, Handle],
    signals: _StopSignals,
) -> None:
    """Launch and settle nodes until none is pending or running, or a stop signal arrived."""
    watchdog, killed = Watchdog(run), dict[str, Stall]()
    while (pending or running) and signals.received is None:
        for node_id, handle in list(running.items()):
            finished = handle.poll()
            if finished is None:
                stall = watchdog.check(node_id, handle.attempt)
                if stall is not None and stall.action != "warn":  # hung: no stop request, it could not act on it
                    killed[node_id] = stall
                    handle.kill()
                continue
            del running[node_id]
            stall = killed.pop(node_id, None)
            if stall is not None and _end_stall(run, node_id, handle.attempt, finished, stall):
                running[node_id] = _launch(run, graph, executor, node_id)
            elif stall is None and finished.exit_code == EXIT_RESTART:  # it asked to start again from its checkpoint
                _end_restart(run, node_id, handle.attempt, finished)
                running[node_id] = _launch(run, graph, executor, node_id)
            elif stall is not None or not _settle(run, graph, node_id, handle.attempt, finished):
                pending[:] = _fail_downstream(run, graph, node_id, pending)
        for node_id in list(pending):
            if signals.received is not None:
                break
            used = sum(executor.slots(n) for n in running)
            if during.after_checkpoint(graph, node_id) is not None:  # an eval during training: its own rules
                if during.has_room(graph, node_id, running, used, jobs) and during.ready(run, graph, node_id):
                    pending.remove(node_id)
                    running[node_id] = _launch(run, graph, executor, node_id)
                continue
            if used >= jobs:
                continue  # full; an eval during training further on may still start
            if used + executor.slots(node_id) > jobs and running:
                continue  # wait for room; a smaller ready node may still fit
            if all(NodeStatus.read(run.node(d)).state == "SUCCEEDED" for d in graph.predecessors(node_id)):
                pending.remove(node_id)
                running[node_id] = _launch(run, graph, executor, node_id)
        if pending and not running:  # nothing can start: dependencies are not satisfiable
            for node_id in pending:
                _set_state(run, node_id, "DEP_FAILED", "a dependency did not succeed")
            pending.clear()
        on_tick()
        time.sleep(POLL_S if running else 0)


def _stopped(
    run: RunDir,
    graph: nx.DiGraph,
    running: dict[str, Handle],
    on_tick: Callable[[], None],
    signals: _StopSignals,
    detach: bool,
    say: Callable[[str], None],
) -> SchedulerStopped:
    """Act on a stop signal: stop the running nodes at a checkpoint (detached: leave them running); a Ctrl-C
    meanwhile kills those still stopping. The message names what happened to each node."""
    signum = signals.received
    assert signum is not None
    name = signal.Signals(signum).name
    if detach and running:
        left = sorted(running)
        message = (
            f"{len(left)} node(s) keep running on their own ({', '.join(left)}); follow them with "
            f"`trinity status {run.root}`; once they end, `trinity resume {run.root}` runs what remains"
        )
        return SchedulerStopped(signum, left, message)
    if not running:
        return SchedulerStopped(signum, [], f"no node was running; continue with `trinity resume {run.root}`")
    stopping = sorted(running)
    why = "interrupted by the user (Ctrl-C)" if signum == signal.SIGINT else f"the scheduler received {name}"
    who = "Ctrl-C" if signum == signal.SIGINT else name
    _say(
        say,
        f"{who}: stopping {len(stopping)} node(s) at their next checkpoint ({', '.join(stopping)}); "
        "Ctrl-C again to kill them at once (they lose the steps since their last committed checkpoint)",
    )
    killed = _stop_all(run, graph, running, on_tick, why, signals, say)
    stopped = [n for n in stopping if n not in killed]
    parts = []
    if stopped:
        parts.append(f"running nodes were stopped at a checkpoint ({', '.join(stopped)})")
    if killed:
        at = ", ".join(f"{n} from step {s}" if s is not None else f"{n} from its start" for n, s in killed.items())
        parts.append(f"{len(killed)} node(s) were killed by a second Ctrl-C before their checkpoint (resume: {at})")
    return SchedulerStopped(signum, [], f"{'; '.join(parts)}; continue with `trinity resume {run.root}`")


def _say(say: Callable[[str], None], line: str) -> None:
    with contextlib.suppress(OSError):  # after a hangup the terminal is gone; the stop goes on
        say(line)


def _launch(run: RunDir, graph: nx.DiGraph, executor: Executor, node_id: str) -> Handle:
    node = graph.nodes[node_id]["node"]
    node_dir = run.node(node_id)
    attempt = next_attempt(node_dir)
    AttemptRecord(attempt=attempt, executor=executor.name, identity=node.identity).write(node_dir)
    status = NodeStatus.read(node_dir)
    status.attempt, status.message = attempt, f"launched attempt {attempt}"
    status.write(node_dir)
    return executor.launch(node_id, attempt)


def _end_stall(run: RunDir, node_id: str, attempt: int, finished: Finished, stall: Stall) -> bool:
    """An attempt the watchdog killed: its record ends STALLED; True if a new attempt is to start (the node is
    PENDING again), False if the node FAILED (no stall restart left)."""
    node_dir = run.node(node_id)
    message = end_stalled(node_dir, attempt, stall.why, finished.exit_code, finished.signal)
    status = NodeStatus.read(node_dir)
    if stall.action == "restart":
        status.state, status.message = "PENDING", f"restarting after attempt {attempt} {message}"
        status.write(node_dir)
        return True
    limit = "execution.watchdog.max_restarts"
    status.state = "FAILED"
    status.message = (
        f"{message}, with no stall restart left ({limit} reached); its log {node_dir.log_file(attempt)} shows "
        f"where it stopped; fix the hang, or raise {limit} or execution.watchdog.stall_after_s, then "
        f"`trinity resume {run.root}`"
    )
    status.write(node_dir)
    return False


def _end_restart(run: RunDir, node_id: str, attempt: int, finished: Finished) -> None:
    """An attempt that exited EXIT_RESTART (RestartRequested): its record ends as RESTART (kept if the node
    wrote it), and a new attempt starts at once: not a failure, nothing downstream is touched."""
    node_dir = run.node(node_id)
    record = AttemptRecord.read(node_dir, attempt)
    if record.end is None or record.state == "RUNNING":
        record.finish(node_dir, "RESTART", finished.exit_code, None, finished.message or "restart requested")
    elif record.exit_code is None:
        record.exit_code = finished.exit_code
        record.write(node_dir)
    status = NodeStatus.read(node_dir)
    status.state, status.message = "PENDING", f"restarting after attempt {attempt}: {record.message}"
    status.write(node_dir)


def _settle(run: RunDir, graph: nx.DiGraph, node_id: str, attempt: int, finished: Finished) -> bool:
    """Record how an attempt ended; True if the node SUCCEEDED."""
    node_dir = run.node(node_id)
    status = NodeStatus.read(node_dir)
    record = AttemptRecord.read(node_dir, attempt)
    if finished.exit_code == 0 and status.state == "SUCCEEDED":
        return True
    message = status.message if status.state == "FAILED" and status.message else finished.message
    if finished.signal is not None and status.state == "FAILED" and status.message and finished.message:
        # A rank killed by a signal said nothing; rank 0 wrote only what it saw (a peer gone): both.
        message = f"{finished.message}; {status.message}"
    if record.end is None or record.state == "RUNNING":
        record.finish(node_dir, "FAILED", finished.exit_code, finished.signal, message)
    elif record.exit_code is None and record.signal is None:  # the node wrote its end; add how it exited
        record.exit_code, record.signal, record.message = finished.exit_code, finished.signal, message
        record.write(node_dir)
    if status.state != "FAILED" or status.message != message:
        status.state, status.message = "FAILED", message or "the node process ended without success"
        status.write(node_dir)
    return False


def _fail_downstream(run: RunDir, graph: nx.DiGraph, node_id: str, pending: list[str]) -> list[str]:
    blocked = nx.descendants(graph, node_id) - during.still_readable(run, graph, node_id)
    for other in pending:
        if other in blocked:
            _set_state(run, other, "DEP_FAILED", f"dependency {node_id} failed")
    return [p for p in pending if p not in blocked]


def _set_state(run: RunDir, node_id: str, state: str, message: str) -> None:
    node_dir = run.node(node_id)
    status = NodeStatus.read(node_dir)
    status.state, status.message = state, message  # type: ignore[assignment]
    status.write(node_dir)


def _stop_all(
    run: RunDir,
    graph: nx.DiGraph,
    running: dict[str, Handle],
    on_tick: Callable[[], None],
    why: str,
    signals: _StopSignals,
    say: Callable[[str], None],
) -> dict[str, int | None]:
    """Ask every running node to stop at a checkpoint and wait for each to end; once `signals.forced` (a
    second Ctrl-C), kill those still running. Returns the killed nodes, each with the step its resume
    continues from (its last committed checkpoint; None: none, it starts over)."""
    for handle in running.values():
        handle.stop()
    sent_kill: set[str] = set()
    killed: dict[str, int | None] = {}
    while running:
        if signals.forced and not sent_kill:
            sent_kill = set(running)
            _say(say, f"Ctrl-C again: killing {len(sent_kill)} node(s) now ({', '.join(sorted(sent_kill))})")
            for handle in running.values():
                handle.kill()
        for node_id, handle in list(running.items()):
            finished = handle.poll()
            if finished is None:
                continue
            del running[node_id]
            if node_id in sent_kill and _end_killed(run, node_id, handle.attempt, finished):
                killed[node_id] = last_committed_step(run.node(node_id))
            else:
                _settle(run, graph, node_id, handle.attempt, Finished(finished.exit_code, finished.signal, why))
        with contextlib.suppress(OSError):  # after a hangup the terminal is gone; the stop goes on
            on_tick()
        if running:
            time.sleep(POLL_S)
    return killed


def _end_killed(run: RunDir, node_id: str, attempt: int, finished: Finished) -> bool:
    """An attempt killed by a second Ctrl-C: its record ends KILLED with the signal, the node FAILED (resume
    continues from its last committed checkpoint). False, leaving it to `_settle`, if the attempt had
    stopped at its checkpoint (and written its end) before the kill reached it."""
    node_dir = run.node(node_id)
    record = AttemptRecord.read(node_dir, attempt)
    if record.end is not None and record.state != "RUNNING":
        return False
    step = last_committed_step(node_dir)
    resume = f"resume continues from its checkpoint at step {step}" if step is not None else "resume starts it over"
    message = f"killed by a second Ctrl-C before it reached a checkpoint; {resume}"
    record.finish(node_dir, "KILLED", finished.exit_code, finished.signal, message)
    status = NodeStatus.read(node_dir)
    status.state, status.message = "FAILED", message
    status.write(node_dir)
    return True
