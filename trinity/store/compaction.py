"""Compaction of telemetry parts: a finished attempt's many small parts merged into one per table and writer.

The writer appends a part per table every flush (every 60 s or 500 steps), so a week of one node
is tens of thousands of small Parquet files, and every catalog opening reads each footer and every
query opens each file. Once an attempt has finished, nothing appends to its folder any more, and
its parts of one table from one writer (trinity.store.telemetry.PART_RE) are merged into one:

    <table>[-<writer>]-<first:06d>-<last:06d>.parquet

which holds, in part order, the rows of that writer's parts of `table` numbered first to last (the
writer numbers its parts across tables, so the range also spans other tables' numbers; how many
parts it holds is in its footer's key-value metadata, PARTS_KEY, which `trinity verify` counts).
Rows are copied unchanged, in the writer's order (so sorted by step as the originals are), with
the columns of SCHEMAS (a part older than ADDED_COLUMNS gets NULLs there, as the views show it).

Atomicity: the merged part is written under a hidden temporary name (zstd, page checksums, row
groups of ROW_GROUP_ROWS), fsynced, renamed into place, the folder fsynced, and only then are the
originals deleted. Every reader (the catalog, verify, the writer's numbering) goes by `current_parts`:
a part whose numbers a merged part of the same table and writer covers is superseded and ignored.
So a crash before the rename leaves the originals counted (the temporary file matches no part
name), and a crash after it the merged part counted: never both, never neither. The next
compaction deletes what such a crash left behind.

When: only finished attempts (`attempt_unfinished`), by `trinity compact RUN_DIR` and at the start
of `trinity run` / `trinity resume`. A part that cannot be read in full is never merged or deleted:
its table stays as it is and the problem is reported (`trinity verify` names it too).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trinity.errors import RunError
from trinity.run.graph import RunGraph
from trinity.run.layout import NodeDir, RunDir, fsync_path, read_json
from trinity.run.status import lease_liveness
from trinity.store.telemetry import ADDED_COLUMNS, SCHEMAS, PartName, parse_part

PARTS_KEY = b"trinity.parts"
"""Footer key-value metadata of a merged part: how many parts as the writer wrote them it holds (decimal)."""
ROW_GROUP_ROWS = 1 << 20
"""Rows per row group of a merged part: large enough that a month's footer stays small, small enough that
DuckDB still skips row groups by their step statistics and merging holds only this much in memory."""
STALE_TEMP_S = 3600.0
"""A hidden temporary file older than this in a finished attempt's folder is left from a crash: deleted."""


# -- which parts count -------------------------------------------------------------------------


def current_parts(folder: Path) -> tuple[dict[Path, PartName], dict[Path, PartName]]:
    """(parts in use, superseded parts) of one attempt's telemetry folder, each sorted by path.

    Superseded: a merged part of the same table and writer covers its numbers (see the module docstring).
    """
    named = {p: n for p in sorted(folder.iterdir()) if (n := parse_part(p.name)) is not None and n.table in SCHEMAS}
    merged = [n for n in named.values() if n.merged]
    current: dict[Path, PartName] = {}
    superseded: dict[Path, PartName] = {}
    for path, name in named.items():
        (superseded if any(m.covers(name) for m in merged) else current)[path] = name
    return current, superseded


def parts_held(path: Path, name: PartName) -> int:
    """How many parts as the writer wrote them the part at `path` holds: 1, or a merged part's PARTS_KEY."""
    if not name.merged:
        return 1
    meta = pq.read_metadata(path).metadata or {}
    return int(meta.get(PARTS_KEY, b"0"))


def _ends(node_dir: NodeDir) -> dict[int, bool]:
    """attempt -> whether its record says it ended, for every attempt with a record or a telemetry folder."""
    ends: dict[int, bool] = {}
    if node_dir.attempts.is_dir():
        for path in node_dir.attempts.glob("[0-9]*.json"):
            try:
                record = read_json(path)
            except (OSError, ValueError):
                record = {}  # being rewritten, or damaged: not known to have ended
            ends[int(path.stem)] = isinstance(record, dict) and record.get("end") is not None
    for attempt, _ in _attempt_folders(node_dir):
        ends.setdefault(attempt, False)
    return ends


def attempt_unfinished(node_dir: NodeDir, attempt: int, ends: Mapping[int, bool] | None = None) -> str | None:
    """Why attempt `attempt` of the node may still be appending telemetry, or None when it has finished.

    Finished: its lease is not live for it (trinity.run.status.lease_liveness) and either its record says
    it ended or a later attempt of the node has started (a crashed attempt's record never says so).
    ends: `_ends(node_dir)` if already read.
    """
    liveness = lease_liveness(node_dir, attempt)
    if liveness.live:
        return f"attempt {attempt} is running ({liveness.why})"
    ends = _ends(node_dir) if ends is None else ends
    if ends.get(attempt) or any(a > attempt for a in ends):
        return None
    return f"attempt {attempt} has not ended (its record has no end and no later attempt started)"


# -- merging -----------------------------------------------------------------------------------


@dataclass
class AttemptCompaction:
    """What compacting one attempt's folder did: parts and bytes before and after, rows merged."""

    folder: Path
    parts_before: int = 0
    parts_after: int = 0
    rows: int = 0
    """Rows of the parts that were merged (all of them are in the merged parts)."""
    bytes_before: int = 0
    bytes_after: int = 0
    problems: list[str] = field(default_factory=list)
    """Tables left as they were, and why (a part that cannot be read in full)."""


class _Unmergeable(Exception):
    """A part of a group cannot be merged (unreadable, or columns this trinity does not know)."""


def _conform(data: pa.Table, table: str, path: Path) -> pa.Table:
    """`data` with exactly the columns of SCHEMAS[table]: NULLs for ADDED_COLUMNS an old part lacks."""
    schema = SCHEMAS[table]
    unknown = [c for c in data.column_names if c not in schema.names]
    if unknown:
        raise _Unmergeable(f"{path} has columns {unknown} that table {table} lacks (a newer trinity wrote it)")
    columns = []
    for f in schema:
        if f.name in data.column_names:
            columns.append(data.column(f.name).cast(f.type))
        elif f.name in ADDED_COLUMNS.get(table, ()):
            columns.append(pa.nulls(data.num_rows, f.type))
        else:
            raise _Unmergeable(f"{path} lacks the column {f.name} of table {table}")
    return pa.table(columns, schema=schema)


def _merge(folder: Path, parts: Sequence[tuple[Path, PartName]]) -> tuple[Path, int]:
    """Write the merged part of `parts` (one table and writer, in number order) atomically; (its path, rows).

    Raises _Unmergeable (nothing written) when a part cannot be read in full or has unknown columns.
    """
    first = parts[0][1]
    table = first.table
    target = folder / PartName(table, first.writer, first.first, max(n.last for _, n in parts)).filename()
    held = sum(parts_held(p, n) for p, n in parts)
    schema = SCHEMAS[table].with_metadata({PARTS_KEY: str(held).encode()})
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    rows = 0
    buffered: list[pa.Table] = []
    try:
        with open(tmp, "wb") as f:
            with pq.ParquetWriter(f, schema, compression="zstd", write_page_checksum=True) as writer:

                def write(tables: list[pa.Table]) -> None:
                    if tables:
                        writer.write_table(pa.concat_tables(tables).replace_schema_metadata(schema.metadata))

                for path, _ in parts:
                    try:
                        data = pq.read_table(path, page_checksum_verification=True)
                    except (OSError, pa.ArrowException) as exc:
                        text = str(exc).strip()
                        why = text.splitlines()[0] if text else type(exc).__name__
                        raise _Unmergeable(f"{path} cannot be read ({why})") from None
                    buffered.append(_conform(data, table, path))
                    rows += data.num_rows
                    if sum(t.num_rows for t in buffered) >= ROW_GROUP_ROWS:
                        whole = pa.concat_tables(buffered)
                        cut = whole.num_rows - whole.num_rows % ROW_GROUP_ROWS
                        write([whole.slice(0, cut)])
                        buffered = [whole.slice(cut)] if cut < whole.num_rows else []
                write(buffered)
            f.flush()
            os.fsync(f.fileno())  # the merged rows are on disk before they have a name
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(folder)  # the name is on disk before any original goes
    return target, rows


def compact_attempt(folder: Path) -> AttemptCompaction:
    """Merge the parts of one finished attempt's telemetry folder (the caller checked it has finished).

    Per table and writer: two or more parts in use become one merged part; parts a merged part
    supersedes (left by a crash) and stale temporary files are deleted.
    """
    result = AttemptCompaction(folder)
    current, superseded = current_parts(folder)
    result.parts_before = len(current) + len(superseded)
    result.bytes_before = sum(p.stat().st_size for p in (*current, *superseded))
    groups: dict[tuple[str, str | None], list[tuple[Path, PartName]]] = {}
    for path, name in current.items():
        groups.setdefault((name.table, name.writer), []).append((path, name))
    doomed = list(superseded)  # already counted through the merged part that covers them
    for (table, writer), parts in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        if len(parts) < 2:
            continue
        parts.sort(key=lambda pn: pn[1].first)
        try:
            _, rows = _merge(folder, parts)
        except _Unmergeable as exc:
            who = "" if writer is None else f" (writer {writer})"
            result.problems.append(f"{table}{who} not compacted: {exc}; `trinity verify` checks every part")
            continue
        result.rows += rows
        doomed += [p for p, _ in parts]
    for path in doomed:
        path.unlink(missing_ok=True)
    for tmp in _stale_temps(folder):
        tmp.unlink(missing_ok=True)
    if doomed:
        fsync_path(folder)
    after, _ = current_parts(folder)
    result.parts_after = len(after)
    result.bytes_after = sum(p.stat().st_size for p in after)
    return result


# -- a run -------------------------------------------------------------------------------------


@dataclass
class CompactionReport:
    """What `compact_run` did: each compacted attempt, and the attempts left alone (with why)."""

    run: Path
    attempts: list[AttemptCompaction] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def parts_before(self) -> int:
        return sum(a.parts_before for a in self.attempts)

    @property
    def parts_after(self) -> int:
        return sum(a.parts_after for a in self.attempts)

    @property
    def rows(self) -> int:
        return sum(a.rows for a in self.attempts)

    @property
    def bytes_before(self) -> int:
        return sum(a.bytes_before for a in self.attempts)

    @property
    def bytes_after(self) -> int:
        return sum(a.bytes_after for a in self.attempts)

    @property
    def problems(self) -> list[str]:
        return [p for a in self.attempts for p in a.problems]


def _stale_temps(folder: Path) -> list[Path]:
    """Hidden temporary files older than STALE_TEMP_S (left by a crash of a writer or a compaction)."""
    stale = []
    for tmp in folder.glob(".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TEMP_S:
                stale.append(tmp)
        except FileNotFoundError:
            pass
    return stale


def _needs_compaction(folder: Path) -> bool:
    """Whether compacting `folder` would change anything: a table and writer with two parts in use, a
    superseded part, or a stale temporary file."""
    current, superseded = current_parts(folder)
    groups = [(n.table, n.writer) for n in current.values()]
    return bool(superseded) or len(set(groups)) < len(groups) or bool(_stale_temps(folder))


def _attempt_folders(node_dir: NodeDir) -> Iterable[tuple[int, Path]]:
    telemetry = node_dir.root / "telemetry"
    if telemetry.is_dir():
        for folder in sorted(telemetry.glob("attempt-*")):
            if folder.is_dir() and folder.name[8:].isdigit():
                yield int(folder.name[8:]), folder


def compact_node_attempt(node_dir: NodeDir, attempt: int) -> AttemptCompaction:
    """Compact one attempt of a node; a RunError when it may still be appending (`attempt_unfinished`)."""
    why = attempt_unfinished(node_dir, attempt)
    if why is not None:
        raise RunError(f"{node_dir.telemetry(attempt)}: not compacted: {why}; compact it once it has finished")
    return compact_attempt(node_dir.telemetry(attempt))


def compact_run(
    run_dir: Path, node: str | None = None, *, on_attempt: Callable[[AttemptCompaction], None] | None = None
) -> CompactionReport:
    """Compact the telemetry of every finished attempt of the run at `run_dir` (or of node `node`).

    Attempts that may still be appending are left alone and listed in `skipped`; attempts with nothing to
    merge are not listed. `on_attempt` hears of each attempt compacted, as it finishes (progress).
    """
    run = RunDir(Path(run_dir))
    graph = RunGraph.load(run)  # a RunError if it is not a run directory
    if node is not None and node not in graph:
        raise RunError(f"{run.root}: no node {node!r} in this run (its nodes: {', '.join(graph.nodes)})")
    report = CompactionReport(run.root)
    for node_id in (node,) if node is not None else tuple(graph.nodes):
        node_dir = run.node(node_id)
        ends = _ends(node_dir)
        for attempt, folder in _attempt_folders(node_dir):
            why = attempt_unfinished(node_dir, attempt, ends)
            if why is not None:
                report.skipped.append(f"{node_id}: {why}")
                continue
            if not _needs_compaction(folder):
                continue
            done = compact_attempt(folder)
            report.attempts.append(done)
            if on_attempt is not None:
                on_attempt(done)
    return report
