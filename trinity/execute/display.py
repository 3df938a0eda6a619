"""What a person watching a run sees: a live table of nodes (state, step, loss, tokens/s) on a
terminal, one line per change otherwise (logs, CI)."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from trinity.run.layout import RunDir
from trinity.run.status import NodeStatus

COLORS = {"SUCCEEDED": "green", "RUNNING": "cyan", "FAILED": "red", "DEP_FAILED": "red", "PENDING": "dim"}
LINE_EVERY_S = 10.0


def node_table(run: RunDir, node_ids: list[str], reused: set[str]) -> Table:
    table = Table(title=escape(str(run.root)), title_justify="left")
    for col in ("node", "state", "attempt", "step", "loss", "tokens/s", "note"):
        table.add_column(col, justify="right" if col in ("attempt", "step", "loss", "tokens/s") else "left")
    for node_id in node_ids:
        s = NodeStatus.read(run.node(node_id))
        p = s.progress
        state = "REUSED" if node_id in reused and s.state == "SUCCEEDED" else s.state
        step = f"{p['step']}/{p.get('total_steps', '?')}" if "step" in p else ""
        table.add_row(
            escape(node_id),
            f"[{COLORS.get(s.state, 'white')}]{state}[/]",
            str(s.attempt or ""),
            step,
            f"{p['loss']:.4f}" if isinstance(p.get("loss"), int | float) else "",
            f"{p['tokens_per_s']:,}" if isinstance(p.get("tokens_per_s"), int | float) else "",
            escape(s.message) if s.state in ("FAILED", "DEP_FAILED") else "",
        )
    return table


def _progress_text(p: dict[str, object]) -> str:
    """' step 5/74 loss 5.1234 2,000 tok/s', with whatever of it the node published."""
    parts = []
    if "step" in p:
        parts.append(f"step {p['step']}/{p.get('total_steps', '?')}")
    if isinstance(p.get("loss"), int | float):
        parts.append(f"loss {p['loss']:.4f}")
    if isinstance(p.get("tokens_per_s"), int | float):
        parts.append(f"{p['tokens_per_s']:,} tok/s")
    return " " + " ".join(parts) if parts else ""


class RunDisplay:
    """Call `tick()` often; it redraws at most a few times a second."""

    def __init__(self, run: RunDir, node_ids: list[str], reused: set[str], console: Console) -> None:
        self.run, self.node_ids, self.reused, self.console = run, node_ids, reused, console
        self.live: Live | None = Live(console=console, refresh_per_second=4) if console.is_terminal else None
        self._seen: dict[str, tuple[str, int]] = {}
        self._last_line = 0.0

    def __enter__(self) -> RunDisplay:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.live is not None:
            self.live.update(node_table(self.run, self.node_ids, self.reused))
            self.live.__exit__(et, ev, tb)

    def tick(self) -> None:
        if self.live is not None:
            self.live.update(node_table(self.run, self.node_ids, self.reused))
            return
        now = time.monotonic()
        periodic = now - self._last_line > LINE_EVERY_S
        for node_id in self.node_ids:
            s = NodeStatus.read(self.run.node(node_id))
            key = (s.state, s.attempt if s.state != "PENDING" else 0)
            if self._seen.get(node_id) != key or (periodic and s.state == "RUNNING" and s.progress):
                self._seen[node_id] = key
                p = s.progress
                extra = _progress_text(p) if s.state == "RUNNING" else ""
                note = f": {s.message}" if s.state in ("FAILED", "DEP_FAILED") else ""
                self.console.print(escape(f"{node_id}: {s.state}{extra}{note}"), highlight=False, soft_wrap=True)
        if periodic:
            self._last_line = now
