"""`trinity logs RUN NODE [--attempt N] [--follow]`: an attempt's log, as its process wrote it.

Each attempt's stdout and stderr (every rank's, prefixed `[rank r] ` when several) go to
nodes/<id>/logs/attempt-NNNN.log (trinity.execute.attempt says what it holds). Without --attempt the
node's latest attempt is shown. --follow goes on printing what is appended while the attempt runs,
and returns once it has ended (its record has an end) or its process is gone (its heartbeat lease is
not live, as `resume` judges it) and the rest of the file is printed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trinity.errors import RunError
from trinity.execute.closeout import dead
from trinity.run.graph import RunGraph
from trinity.run.layout import NodeDir, RunDir
from trinity.run.status import list_attempts

FOLLOW_POLL_S = 0.5
CHUNK = 1 << 16


@dataclass(frozen=True)
class AttemptLog:
    node_id: str
    node_dir: NodeDir
    attempt: int
    path: Path

    def ended(self) -> bool:
        """Whether the attempt is over: its record has an end, or its process is gone (trinity.execute.closeout)."""
        attempts = list_attempts(self.node_dir)
        index = next(i for i, a in enumerate(attempts) if a.attempt == self.attempt)
        record = attempts[index]
        if record.state != "RUNNING":
            return True
        later = attempts[index + 1] if index + 1 < len(attempts) else None
        return dead(self.node_dir, record, later, time.time()) is not None


def attempt_log(run_dir: Path, node_id: str, attempt: int | None = None) -> AttemptLog:
    """The log of `node_id`'s attempt `attempt` (None: its latest); a RunError says what exists instead."""
    run = RunDir(run_dir.resolve())
    graph = RunGraph.load(run)  # refuses a folder that is not a run
    if node_id not in graph.nodes:
        raise RunError(f"{run.root}: no node {node_id!r} (nodes: {', '.join(sorted(graph.nodes))})")
    node_dir = run.node(node_id)
    numbers = [a.attempt for a in list_attempts(node_dir)]
    if not numbers:
        raise RunError(f"{node_id} has no attempt yet in {run.root}: it has not run (see `trinity status {run.root}`)")
    chosen = numbers[-1] if attempt is None else attempt
    if chosen not in numbers:
        raise RunError(f"{node_id} has no attempt {chosen} (attempts: {', '.join(map(str, numbers))})")
    path = node_dir.log_file(chosen)
    if not path.is_file():
        raise RunError(
            f"{node_id} attempt {chosen} has no log ({path} is missing): its attempt record exists, so the "
            "file was deleted, or the attempt never reached its executor"
        )
    return AttemptLog(node_id, node_dir, chosen, path)


def show(log: AttemptLog, write: Callable[[bytes], None], follow: bool = False) -> None:
    """Write the log's bytes with `write`; with `follow`, what is appended too, until the attempt has ended."""
    with open(log.path, "rb") as file:
        while True:
            over = follow and log.ended()  # judged before the read: nothing written before its end is missed
            while chunk := file.read(CHUNK):
                write(chunk)
            if not follow or over:
                return
            time.sleep(FOLLOW_POLL_S)
