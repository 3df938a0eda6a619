"""`trinity verify RUN [NODE]`: is everything a run stored still as it was written?

Checked, for every node of the run (or the one asked for):

- every committed checkpoint (nodes/<id>/checkpoints/step-*/ with a COMMITTED marker): every file
  against the checksum its marker records, every chunk of every array present
  (trinity.store.checkpoint_integrity; a marker from before checksums: structure only, noted);
  checkpoints set aside as damaged by a resume (step-*.damaged) are noted, not checked;
- every telemetry part (nodes/<id>/telemetry/attempt-NNNN/<table>-<seq>.parquet): read in full
  (footer, schema, every page, each page's CRC where the part has them: TelemetryWriter writes them)
  and its columns those of its table; and the part numbers of each
  attempt, which count up from 0 across tables, have no gap (a deleted part: its rows are lost).
  A part deleted from the end of an attempt leaves no gap and cannot be told from one never written.
  A merged part (trinity.store.compaction) is checked like any part and stands for the numbers it
  covers; how many parts it holds (its footer says) must make up the numbers no part names, so a
  deleted merged part is found too. A part a merged part covers (a crash during compaction left
  it) is not in use: noted, not checked.

The result is a VerifyReport; each problem is one line that names the file (or the checkpoint and
its array). Nothing is changed or repaired.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trinity.errors import RunError
from trinity.run.graph import RunGraph
from trinity.run.layout import NodeDir, RunDir
from trinity.store.checkpoint_commit import list_checkpoints, list_set_aside
from trinity.store.checkpoint_integrity import check_checkpoint
from trinity.store.compaction import current_parts, parts_held
from trinity.store.telemetry import ADDED_COLUMNS, SCHEMAS, PartName


@dataclass(frozen=True)
class VerifyReport:
    """What `verify_run` checked and found. `problems`: one line each, naming the file; `notes`: what
    could not be checked fully or was set aside earlier (not damage of what is in use)."""

    run: Path
    nodes: tuple[str, ...]
    checkpoints: int
    parts: int
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_part(path: Path, table: str) -> str | None:
    """Why the telemetry part at `path` of `table` cannot be used (read in full), or None."""
    try:
        data = pq.read_table(path, page_checksum_verification=True)  # the CRC of every page
    except (OSError, pa.ArrowException) as exc:
        text = str(exc).strip()
        return f"cannot be read as Parquet ({text.splitlines()[0] if text else type(exc).__name__})"
    optional = ADDED_COLUMNS.get(table, ())  # newer than the part: NULL in the views
    missing = [n for n in SCHEMAS[table].names if n not in data.column_names and n not in optional]
    return f"lacks the columns {missing} of table {table}" if missing else None


def check_attempt_telemetry(folder: Path) -> tuple[int, list[str], list[str]]:
    """(parts checked, problems, notes) of one attempt's telemetry folder: each part in use, and gaps in
    their numbers. Parts a merged part covers are notes (trinity.store.compaction.current_parts)."""
    problems: list[str] = []
    current, superseded = current_parts(folder)
    notes = [
        f"{p}: its rows are in a merged part (a compaction stopped before deleting it); `trinity compact` removes it"
        for p in superseded
    ]
    by_writer: dict[str | None, dict[int, tuple[Path, PartName]]] = {}  # each writer numbers its own parts
    for p, name in current.items():
        by_writer.setdefault(name.writer, {})[name.first] = (p, name)
        problem = check_part(p, name.table)
        if problem is not None:
            problems.append(f"{p}: {problem}")
    for parts in by_writer.values():
        last = max(n.last for _, n in parts.values())
        named = {s for _, n in parts.values() for s in (n.first, n.last)}
        spans = [(n.first, n.last, p) for p, n in parts.values() if n.merged]
        unnamed = [s for s in range(last + 1) if s not in named]  # no part has this number in its name
        lost = [s for s in unnamed if not any(lo < s < hi for lo, hi, _ in spans)]
        for seq in lost:
            after = max((s for s in named if s < seq), default=None)
            before = min(s for s in named if s > seq)
            around = f"after {_holder(parts, after).name} and " if after is not None else ""
            problems.append(
                f"{folder}: telemetry part {seq:06d} is missing ({around}before {_holder(parts, before).name}): "
                f"its rows are lost"
            )
        if spans:  # the numbers inside merged ranges that no part names: held by the merged parts?
            inside = len(unnamed) - len(lost)
            held = 0
            for p, n in parts.values():
                if n.merged:
                    with contextlib.suppress(OSError, ValueError, pa.ArrowException):  # unreadable: a problem above
                        held += parts_held(p, n) - 2  # its first and last are named
            if held < inside:
                gone = inside - held
                problems.append(
                    f"{folder}: {gone} telemetry part{'s are' if gone != 1 else ' is'} missing from the ranges of "
                    f"its merged parts ({', '.join(p.name for _, _, p in spans)}): their rows are lost"
                )
    return len(current), problems, notes


def _holder(parts: dict[int, tuple[Path, PartName]], seq: int) -> Path:
    """The part whose name has number `seq` (its first or last)."""
    return next(p for p, n in parts.values() if seq in (n.first, n.last))


def verify_node(node_dir: NodeDir) -> tuple[int, int, list[str], list[str]]:
    """(committed checkpoints checked, telemetry parts checked, problems, notes) of one node's folder."""
    problems: list[str] = []
    notes: list[str] = []
    committed = [c for c in list_checkpoints(node_dir.checkpoints) if c.committed]
    for c in committed:
        found, said = check_checkpoint(c.path)
        problems += found
        notes += said
    for aside in list_set_aside(node_dir.checkpoints):
        notes.append(f"{aside}: set aside as damaged by a resume (not used); inspect it, then delete it")
    parts = 0
    telemetry = node_dir.root / "telemetry"
    if telemetry.is_dir():
        for attempt in sorted(telemetry.glob("attempt-*")):
            if attempt.is_dir() and attempt.name[8:].isdigit():
                n, found, said = check_attempt_telemetry(attempt)
                parts += n
                problems += found
                notes += said
    return len(committed), parts, problems, notes


def verify_run(run_dir: Path, node: str | None = None) -> VerifyReport:
    """Check every committed checkpoint and telemetry part of the run at `run_dir` (or of node `node`)."""
    run = RunDir(Path(run_dir))
    graph = RunGraph.load(run)  # a RunError if it is not a run directory
    if node is not None and node not in graph:
        raise RunError(f"{run.root}: no node {node!r} in this run (its nodes: {', '.join(graph.nodes)})")
    nodes = (node,) if node is not None else tuple(graph.nodes)
    checkpoints = parts = 0
    problems: list[str] = []
    notes: list[str] = []
    for node_id in nodes:
        c, p, found, said = verify_node(run.node(node_id))
        checkpoints += c
        parts += p
        problems += found
        notes += said
    return VerifyReport(run.root, nodes, checkpoints, parts, tuple(problems), tuple(notes))
