"""The local executor: each node attempt in its own subprocess (a crash kills the node, not the run).

A training node whose layout has several ranks (parallel.gpus_per_node > 1, parallel.nodes = 1)
runs as `python -m torch.distributed.run --standalone --nproc-per-node N -m trinity.execute.attempt ...`:
torchrun starts the N rank processes with the rendezvous in their environment, forwards SIGTERM
to them (they commit a checkpoint and exit) and tears the others down when one fails. torchrun
exits 1 whatever went wrong, so how the attempt ended is read from the ranks' own records and
torchrun's failure report (see `torchrun_outcome`).

Every attempt runs in its own session, so a terminal's Ctrl-C or hangup reaches the scheduler
alone, which then stops the nodes at a checkpoint. Each node process (each rank) watches the
scheduler through the pid and start time the launch passes it (trinity.execute.attempt:
SchedulerWatch) and stops at a checkpoint by itself if the scheduler ends without stopping it
(SIGKILL, a crash). `detach` (trinity run --detach) launches nodes that watch nothing.

`trinity cancel RUN [NODE]` of a local run (`cancel_local`) stops the running nodes as a stop signal
does, whoever launched them (a scheduler, a `--detach` run): SIGTERM to each node's process (rank 0 of
a multi-rank node, which stops its peers at the same step), found by its live heartbeat lease; a
training node commits a checkpoint and exits; its attempt ends STOPPED, "cancelled with `trinity
cancel`", and the node FAILED (its dependants DEP_FAILED if a scheduler runs them; `resume` goes on).
One that has not stopped within STOP_GRACE_S is killed (SIGKILL) and its attempt ends KILLED.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trinity.errors import RunError
from trinity.execute.attempt import SCHEDULER_PID_ENV, SCHEDULER_START_ENV, cancel_marker
from trinity.execute.executor import Finished
from trinity.graph.kinds import node_world_size
from trinity.run.graph import GraphNode, RunGraph
from trinity.run.layout import NodeDir, RunDir
from trinity.run.ranks import read_rank_ends
from trinity.run.status import AttemptRecord, Lease, NodeStatus, lease_liveness, now_iso, own_process, process_alive
from trinity.spec.experiment import ExperimentSpec

STOP_GRACE_S = 120.0
TORCHRUN_SHUTDOWN_S = int(STOP_GRACE_S) - 10
"""How long torchrun lets its ranks commit a checkpoint after SIGTERM before it kills them."""
REPORTED_EXIT = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")
"""One failure in torchrun's report: '  rank      : 1 (local_rank: 1)' then '  exitcode  : -9 (pid: 8777)'."""


@dataclass
class LocalHandle:
    node_id: str
    attempt: int
    process: subprocess.Popen[bytes]
    stop_sent: float | None = field(default=None)
    ranks: int = 1
    """Processes of the attempt (more than 1: `process` is torchrun)."""
    node_dir: NodeDir | None = None
    log_path: Path | None = None

    def poll(self) -> Finished | None:
        code = self.process.poll()
        if code is None:
            if self.stop_sent is not None and time.monotonic() - self.stop_sent > STOP_GRACE_S:
                self._kill()
            return None
        if code < 0:
            return Finished(None, -code, f"killed by signal {signal.Signals(-code).name}")
        if code > 0 and self.ranks > 1 and self.node_dir is not None and self.log_path is not None:
            return torchrun_outcome(self.node_dir, self.attempt, self.ranks, code, self.log_path)
        return Finished(code, None, "" if code == 0 else f"exited with status {code}")

    def stop(self) -> None:
        """SIGTERM: the node commits a checkpoint at the next step and exits; SIGKILL after a grace period.

        Under torchrun the signal goes to torchrun, which forwards it to every rank."""
        if self.process.poll() is None and self.stop_sent is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.stop_sent = time.monotonic()

    def kill(self) -> None:
        """SIGKILL the attempt's whole process tree now (the stall watchdog: a hung node gets no grace)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                self._kill()

    def _kill(self) -> None:
        # torchrun starts each rank in its own session: kill the ranks' groups, then torchrun's.
        for child in _children(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)
        os.killpg(self.process.pid, signal.SIGKILL)


def torchrun_outcome(node_dir: NodeDir, attempt: int, ranks: int, code: int, log_path: Path) -> Finished:
    """How a torchrun attempt ended, as a single process's exit would say it (torchrun itself exits 1).

    A rank killed by a signal wrote no end record: the signal, from torchrun's failure report, is
    the cause. Otherwise rank 0's record says (its exit status carries the deciding rank's: 3 when
    stopped, 1 when failed)."""
    ends = read_rank_ends(node_dir, attempt)
    exits = _reported_exits(log_path)
    killed = sorted(r for r, status in exits.items() if status < 0 and r not in ends)
    if killed:
        sig = -exits[killed[0]]
        return Finished(None, sig, f"rank {killed[0]} killed by signal {signal.Signals(sig).name}")
    if 0 in ends:
        return Finished(ends[0].exit_code, None, ends[0].message)
    silent = ", ".join(str(r) for r in range(ranks) if r not in ends)
    return Finished(code, None, f"torchrun exited with status {code}; ranks without an end record: {silent}")


def _reported_exits(log_path: Path) -> dict[int, int]:
    """rank -> exit status (negative: the signal) from torchrun's last failure report in the log."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, log_path.stat().st_size - 65536))
            tail = log.read().decode(errors="replace")
    except OSError:
        return {}
    report = tail[tail.rfind("Failures:") :] if "Failures:" in tail else ""
    return {int(rank): int(status) for rank, status in REPORTED_EXIT.findall(report)}


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@dataclass
class LocalExecutor:
    run: RunDir
    name: str = "local"
    env: dict[str, str] = field(default_factory=dict)
    detach: bool = False
    """Launch nodes that do not watch this scheduler: they run on when it ends (`trinity run --detach`)."""
    _graph: RunGraph | None = field(default=None, repr=False)
    _specs: dict[str, ExperimentSpec] = field(default_factory=dict, repr=False)

    def _node(self, node_id: str) -> tuple[GraphNode, ExperimentSpec]:
        """The node's graph.json entry and the spec it runs with (each file read once)."""
        if self._graph is None:
            self._graph = RunGraph.load(self.run)
        node = self._graph[node_id]
        if node.spec_file not in self._specs:
            self._specs[node.spec_file] = self._graph.spec(node)
        return node, self._specs[node.spec_file]

    def ranks(self, node_id: str) -> int:
        """Processes an attempt of the node runs as (its slots in `--jobs`)."""
        node, spec = self._node(node_id)
        return node_world_size(node.kind, spec)

    def slots(self, node_id: str) -> int:
        return self.ranks(node_id)

    def check(self, node_ids: list[str]) -> None:
        """Refuse, before anything runs, a layout this machine cannot launch: one machine only."""
        problems = []
        for node_id in node_ids:
            node, spec = self._node(node_id)
            if node_world_size(node.kind, spec) > 1 and spec.parallel.nodes > 1:
                problems.append(node_id)
        if problems:
            _, spec = self._node(problems[0])
            raise RunError(
                f"parallel.nodes = {spec.parallel.nodes} for {', '.join(problems)}: the local executor runs a "
                "training node's ranks on this machine only (parallel.nodes must be 1; the ranks are "
                "parallel.gpus_per_node). Set parallel.nodes=1 or run with --executor slurm."
            )

    def launch(self, node_id: str, attempt: int) -> LocalHandle:
        node_dir = self.run.node(node_id)
        log_path = node_dir.log_file(attempt)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        entry = ["-m", "trinity.execute.attempt", str(self.run.root), node_id, "--attempt", str(attempt)]
        entry += ["--executor", self.name]
        env = {k: v for k, v in os.environ.items() if k not in (SCHEDULER_PID_ENV, SCHEDULER_START_ENV)}
        env["PYTHONUNBUFFERED"] = "1"
        if not self.detach:
            me = own_process()
            env[SCHEDULER_PID_ENV] = str(me.pid)
            if me.start is not None:
                env[SCHEDULER_START_ENV] = str(me.start)
        ranks = self.ranks(node_id)
        if ranks > 1:
            _, spec = self._node(node_id)
            threads = spec.execution.local.threads or max(1, (os.cpu_count() or 1) // ranks)
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(ranks),
                "--shutdown-timeout",
                str(TORCHRUN_SHUTDOWN_S),
                "--log-dir",
                str(node_dir.logs / f"torchrun-{attempt:04d}"),
                *entry,
            ]
            env["OMP_NUM_THREADS"] = str(threads)
        else:
            command = [sys.executable, *entry]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C and hangups reach the scheduler, which stops nodes cleanly
                env={**env, **self.env},
            )
        return LocalHandle(node_id, attempt, process, ranks=ranks, node_dir=node_dir, log_path=log_path)


def cancel_local(run: RunDir, node_ids: list[str], grace_s: float = STOP_GRACE_S) -> list[str]:
    """Stop the running nodes among `node_ids` at a checkpoint (see the module docstring); one line per node
    that was running, saying how its attempt ended."""
    lines: list[str] = []
    targets: dict[str, tuple[int, Lease]] = {}
    for node_id in node_ids:
        node_dir = run.node(node_id)
        status = NodeStatus.read(node_dir)
        if status.state != "RUNNING":
            continue
        liveness = lease_liveness(node_dir, status.attempt)
        if not liveness.live or liveness.lease is None:
            continue
        lease = liveness.lease
        if lease.host != socket.gethostname():
            lines.append(f"{node_id}: runs on {lease.host} (pid {lease.pid}); run `trinity cancel` there")
            continue
        cancel_marker(node_dir, status.attempt).write_text(f"trinity cancel, pid {os.getpid()}, {now_iso()}\n")
        with contextlib.suppress(ProcessLookupError):
            os.kill(lease.pid, signal.SIGTERM)
        targets[node_id] = (status.attempt, lease)
    deadline = time.monotonic() + grace_s
    while any(_still_running(run, n, a, lease) for n, (a, lease) in targets.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for node_id, (attempt, lease) in targets.items():
        node_dir = run.node(node_id)
        if _still_running(run, node_id, attempt, lease) and process_alive(lease.pid, lease.start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(lease.pid, signal.SIGKILL)
            record = AttemptRecord.read(node_dir, attempt)
            message = f"killed by `trinity cancel`: it did not stop at a checkpoint within {grace_s:.0f} s"
            record.finish(node_dir, "KILLED", None, int(signal.SIGKILL), message)
        record = AttemptRecord.read(node_dir, attempt)
        lines.append(f"{node_id}: attempt {attempt} {record.state}: {record.message}")
    return lines


def _still_running(run: RunDir, node_id: str, attempt: int, lease: Lease) -> bool:
    """Whether the attempt has not yet recorded its end and its process lives."""
    record = AttemptRecord.read(run.node(node_id), attempt)
    return record.state == "RUNNING" and process_alive(lease.pid, lease.start)
