"""`trinity watch RUN`: a live view of a run in the terminal (rich), refreshed every few seconds, no server.

Every refresh reads only small files: each node's status.json (state and the progress the training loop
publishes: step, total_steps, loss, tokens/s, and when present grad_norm, max_vio, spikes, alarms and
loss_history), each RUNNING node's lease.json (liveness by `lease_liveness`, a stall by `lease_stall`) and
the newest few `events` parts of its running attempt (EVENT_PARTS per writer, read with pyarrow; parts are
immutable once named, so each is read once). It never opens the catalog, so a refresh costs the same on
the first day of a run and in its second week.

ETA is the remaining steps times the recent step time, measured from the progress the node published
(its step and status.json's `updated` time, over the last STEP_WINDOW samples; before two samples, the
tokens per step over tokens/s). The loss sparkline shows `loss_history` when the node publishes one, else
the losses this watch has seen.

When the run has ended, the view exits (status 0, or 1 naming the nodes that FAILED, DEP_FAILED or died).
The run has ended when all three hold:
- no node is RUNNING with a live lease (a RUNNING node whose lease is dead has died: it counts as failed);
- no scheduler holds the run's lock (RUN/.lock: `trinity run` / `resume` hold it while they may still
  launch PENDING nodes), judged by /proc/locks, else by the pid written in it;
- no PENDING node has a Slurm job still queued (RUN/slurm_jobs.json; the node states are reconciled with
  Slurm at most every SLURM_RECONCILE_S).
PENDING nodes left when it ends were not selected (`--nodes`) or wait for a `trinity resume`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trinity.cli_render import human_count, printable
from trinity.run.graph import RunGraph
from trinity.run.layout import RunDir, read_json
from trinity.run.status import NodeStatus, lease_liveness, lease_stall, process_alive
from trinity.store.telemetry import PART_RE

EVENT_PARTS = 3
"""The newest `events` parts read per writer of a running attempt, per refresh (bounded work)."""
EVENTS_SHOWN = 4
"""The last events shown per running node."""
STEP_WINDOW = 8
"""Progress samples (step, time) kept per node for the recent step time."""
LOSS_POINTS = 32
"""Losses in a sparkline."""
SLURM_RECONCILE_S = 30.0
"""How often a Slurm run's node states are reconciled with the queue."""
SPARK = "▁▂▃▄▅▆▇█"
FAILED_STATES = ("FAILED", "DEP_FAILED")


def sparkline(values: Iterable[float]) -> str:
    """Unicode bars from the lowest value (▁) to the highest (█); non-finite values are left out."""
    points = [v for v in values if v == v and abs(v) != float("inf")]
    if not points:
        return ""
    low, high = min(points), max(points)
    scale = (len(SPARK) - 1) / (high - low) if high > low else 0.0
    return "".join(SPARK[round((v - low) * scale)] for v in points)


def duration(seconds: float) -> str:
    """3h07m, 4m05s, 42s."""
    s = max(round(seconds), 0)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass
class Event:
    step: int
    time: float
    kind: str
    message: str


@dataclass
class NodeView:
    """What the view shows of one RUNNING node."""

    id: str
    attempt: int
    step: int | None
    total: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    grad_norm: float | None
    max_vio: float | None
    losses: list[float]
    events: list[Event]
    mark: str
    """'' (live and advancing), 'STALLED: why', 'dead: why' or 'stopping'."""
    notes: str = ""
    """Spikes and alarms the node counted, when it publishes them."""


@dataclass
class Frame:
    """One refresh: the run, its counts, its running nodes and whether it has ended."""

    name: str
    root: Path
    counts: dict[str, int]
    running: list[NodeView]
    scheduler: str
    """'scheduler pid N', 'Slurm: K job(s) queued' or 'no scheduler'."""
    ended: bool
    failed: list[str] = field(default_factory=list)
    """Nodes FAILED, DEP_FAILED or dead (RUNNING with a dead lease)."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _worst(value: Any) -> float | None:
    """The largest of a number, a list of numbers or a mapping of them (per-layer MaxVio)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        numbers = [n for n in map(_number, value) if n is not None]
        return max(numbers) if numbers else None
    return _number(value)


def _loss_values(history: Any) -> list[float] | None:
    """A published loss_history as floats: numbers, [step, loss] pairs or {"loss": x} mappings."""
    if not isinstance(history, list):
        return None
    values = []
    for item in history:
        if isinstance(item, list | tuple) and item:
            item = item[-1]
        elif isinstance(item, dict):
            item = item.get("loss")
        if (number := _number(item)) is not None:
            values.append(number)
    return values


def _count(value: Any) -> int:
    if isinstance(value, list | dict):
        return len(value)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def scheduler_pid(run: RunDir) -> int | None:
    """The pid of the scheduler (`trinity run` / `resume`) holding the run's lock, or None when none does.

    /proc/locks names the holder of every flock by device and inode, so a lock file left behind by an ended
    scheduler (its pid still written in it) is not mistaken for a held one; without /proc/locks (or when the
    lock is not found there, e.g. on a file system that reports other inode numbers), the pid written in the
    file counts if it is a running trinity process.
    """
    path = run.root / ".lock"
    try:
        st = path.stat()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == dev and fields[4].isdigit():
                return int(fields[4])
    except OSError:
        pass
    try:
        pid = int(read_json(path).get("pid", 0))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return pid if process_alive(pid) and b"trinity" in cmdline else None


class Watcher:
    """Builds the frames of one run; keeps what it saw (progress samples, losses, events parts) between them."""

    def __init__(self, run_dir: Path) -> None:
        self.run = RunDir(run_dir.resolve())
        self.graph = RunGraph.load(self.run)  # refuses a folder that is not a run
        meta = read_json(self.run.run_json)
        self.name = str(meta.get("name", ""))
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._losses: dict[str, deque[tuple[int, float]]] = {}
        self._parts: dict[Path, list[Event]] = {}
        self._slurm_states: dict[str, str] = {}
        self._reconciled = 0.0

    def frame(self) -> Frame:
        counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        running, failed, queued = [], [], 0
        slurm = self._slurm_jobs()
        for node_id in self.graph.nodes:
            node_dir = self.run.node(node_id)
            status = NodeStatus.read(node_dir)
            if status.state == "SUCCEEDED":
                counts["done"] += 1
            elif status.state in FAILED_STATES:
                counts["failed"] += 1
                failed.append(node_id)
            elif status.state == "PENDING":
                counts["pending"] += 1
                queued += node_id in slurm
            else:  # RUNNING
                liveness = lease_liveness(node_dir, status.attempt)
                if liveness.live:
                    counts["running"] += 1
                    stall = lease_stall(liveness.lease) if liveness.lease is not None else None
                    mark = f"STALLED: {stall}" if stall else ("stopping" if liveness.orphaned else "")
                else:
                    counts["failed"] += 1
                    failed.append(node_id)
                    mark = f"dead: {liveness.why}"
                running.append(self._node_view(node_id, status, mark))
        pid = scheduler_pid(self.run)
        if pid is not None:
            scheduler = f"scheduler pid {pid}"
        elif queued:
            scheduler = f"Slurm: {queued} node(s) queued"
        else:
            scheduler = "no scheduler"
        ended = counts["running"] == 0 and pid is None and queued == 0
        return Frame(self.name, self.run.root, counts, running, scheduler, ended, failed)

    def _slurm_jobs(self) -> set[str]:
        """Nodes with a Slurm job (RUN/slurm_jobs.json), their states reconciled every SLURM_RECONCILE_S."""
        path = self.run.root / "slurm_jobs.json"
        if not path.is_file():
            return set()
        if time.monotonic() - self._reconciled > SLURM_RECONCILE_S:
            self._reconciled = time.monotonic()
            from trinity.execute.commands import load_run_spec
            from trinity.execute.slurm import reconcile
            from trinity.graph.compile import compile_graph

            with contextlib.suppress(Exception):  # a queue that does not answer now: the node states as they are
                reconcile(self.run, compile_graph(load_run_spec(self.run)))
        try:
            return set(read_json(path))
        except (OSError, ValueError):
            return set()

    def _node_view(self, node_id: str, status: NodeStatus, mark: str) -> NodeView:
        p = status.progress
        step, total = p.get("step"), p.get("total_steps")
        step = step if isinstance(step, int) else None
        total = total if isinstance(total, int) else None
        loss = _number(p.get("loss"))
        samples = self._samples.setdefault(node_id, deque(maxlen=STEP_WINDOW))
        losses = self._losses.setdefault(node_id, deque(maxlen=LOSS_POINTS))
        if step is not None:
            try:
                updated = datetime.fromisoformat(status.updated).timestamp()
            except ValueError:
                updated = time.time()
            if not samples or samples[-1][1] != step:
                samples.append((updated, step))
            if loss is not None and (not losses or losses[-1][0] != step):
                losses.append((step, loss))
        history = _loss_values(p.get("loss_history"))
        notes = [f"{n} {what}" for what in ("spikes", "alarms") if (n := _count(p.get(what)))]
        return NodeView(
            id=node_id,
            attempt=status.attempt,
            step=step,
            total=total,
            loss=loss,
            tokens_per_s=_number(p.get("tokens_per_s")),
            eta_s=self._eta(samples, p, step, total),
            grad_norm=_number(p.get("grad_norm")),
            max_vio=_worst(p.get("max_vio")),
            losses=(history if history else [v for _, v in losses])[-LOSS_POINTS:],
            events=self._events(node_id, status.attempt),
            mark=mark,
            notes=", ".join(notes),
        )

    @staticmethod
    def _eta(samples: deque[tuple[float, int]], p: dict[str, Any], step: int | None, total: int | None) -> float | None:
        if step is None or total is None:
            return None
        if len(samples) >= 2 and samples[-1][1] > samples[0][1]:
            step_s = (samples[-1][0] - samples[0][0]) / (samples[-1][1] - samples[0][1])
        else:
            tokens, rate = _number(p.get("tokens")), _number(p.get("tokens_per_s"))
            if not tokens or not rate or step <= 0:
                return None
            step_s = tokens / step / rate
        return max(total - step, 0) * step_s

    def _events(self, node_id: str, attempt: int) -> list[Event]:
        """The last EVENTS_SHOWN events of the attempt, from the newest EVENT_PARTS parts of each writer."""
        folder = self.run.node(node_id).telemetry(attempt) if attempt > 0 else None
        if folder is None or not folder.is_dir():
            return []
        newest: dict[str | None, list[tuple[int, Path]]] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                m = PART_RE.match(entry.name)
                if m and m["table"] == "events":
                    newest.setdefault(m["writer"], []).append((int(m["seq"]), Path(entry.path)))
        chosen = [path for parts in newest.values() for _, path in sorted(parts)[-EVENT_PARTS:]]
        events = [e for path in chosen for e in self._read_part(path)]
        keep = set(chosen) | {p for p in self._parts if p.parent != folder}
        self._parts = {p: rows for p, rows in self._parts.items() if p in keep}
        return sorted(events, key=lambda e: (e.time, e.step))[-EVENTS_SHOWN:]

    def _read_part(self, path: Path) -> list[Event]:
        if path not in self._parts:
            try:
                table = pq.read_table(path, columns=["step", "time", "kind", "message"])
                rows = table.to_pylist()
            except Exception:  # a damaged part is `trinity verify`'s business: the view goes on without it
                rows = []
            self._parts[path] = [
                Event(int(r["step"]), r["time"].timestamp() if r["time"] else 0.0, str(r["kind"]), r["message"] or "")
                for r in rows
            ]
        return self._parts[path]


def render(frame: Frame) -> RenderableType:
    """The summary line, a table of the running nodes, and each one's last events."""
    c = frame.counts
    summary = Text(
        printable(f"{frame.name}  {frame.root}\n")
        + f"{c['done']} done, {c['running']} running, {c['pending']} pending, {c['failed']} failed"
        + printable(f"  ·  {frame.scheduler}  ·  {time.strftime('%H:%M:%S')}")
    )
    parts: list[RenderableType] = [summary]
    if frame.running:
        table = Table(show_edge=False, pad_edge=False)
        for col in ("node", "step", "tokens/s", "ETA", "loss", "", "grad norm", "MaxVio", "state"):
            table.add_column(
                col, justify="right" if col in ("step", "tokens/s", "ETA", "grad norm", "MaxVio") else "left"
            )
        for n in frame.running:
            step = f"{n.step}/{n.total}" if n.step is not None and n.total is not None else "-"
            state = Text(printable(n.mark or "running"), style="red" if n.mark else "green")
            if n.notes:
                state.append(printable(f" ({n.notes})"), style="yellow")
            table.add_row(
                Text(printable(f"{n.id} #{n.attempt}")),
                step,
                human_count(n.tokens_per_s) if n.tokens_per_s is not None else "-",
                duration(n.eta_s) if n.eta_s is not None else "-",
                f"{n.loss:.4f}" if n.loss is not None else "-",
                Text(sparkline(n.losses), style="cyan"),
                f"{n.grad_norm:.3g}" if n.grad_norm is not None else "-",
                f"{n.max_vio:.3g}" if n.max_vio is not None else "-",
                state,
            )
        parts.append(table)
        for n in frame.running:
            for e in n.events:
                line = f"  {n.id} step {e.step}  {e.kind}" + (f": {e.message}" if e.message else "")
                parts.append(Text(printable(line, newlines=False), style="dim"))
    return Group(*parts)


def ending(frame: Frame) -> tuple[int, str]:
    """The exit status and last line once the run has ended."""
    if frame.failed:
        return 1, f"the run has ended; did not succeed: {', '.join(frame.failed)} (see `trinity status {frame.root}`)"
    return 0, f"the run has ended: {frame.counts['done']} node(s) done, {frame.counts['pending']} not run"


def watch(run_dir: Path, console: Console, interval_s: float = 2.0, once: bool = False) -> int:
    """Show the run until it ends (see the module docstring); returns the exit status (130 on Ctrl-C).
    `once`, or output that is not a terminal with `once`: print one frame and return 0."""
    watcher = Watcher(run_dir)
    frame = watcher.frame()
    if once:
        console.print(render(frame))
        return 0
    try:
        if not console.is_terminal:  # a pipe or a file: one frame per refresh, as text
            while not frame.ended:
                console.print(render(frame))
                time.sleep(interval_s)
                frame = watcher.frame()
            console.print(render(frame))
        else:
            with Live(render(frame), console=console, auto_refresh=False, transient=False) as live:
                while not frame.ended:
                    time.sleep(interval_s)
                    frame = watcher.frame()
                    live.update(render(frame), refresh=True)
    except KeyboardInterrupt:
        console.print("stopped watching; the run goes on", highlight=False)
        return 130
    code, line = ending(frame)
    console.print(Text(printable(line), style="red" if code else "green"))
    return code
