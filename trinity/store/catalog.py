"""DuckDB over one run or a folder of runs: metadata tables, telemetry views, read-only SQL.

Nothing here writes. `open_catalog` builds a fresh in-memory DuckDB database each time: the run
metadata (run.json, graph.json, status and attempt records) is loaded with Python's json module
into small tables, and the telemetry Parquet parts of every node attempt become views, so a
query always sees every part committed so far, while nodes keep appending. Writers never wait for
readers and readers never lock a file (there is no shared database file to lock).

A resumed attempt rewrites the steps after the checkpoint it restored, so the views come in two
kinds: `<table>_history` holds every row ever written (keyed by run, node, attempt, step), and
`<table>` shows each step once. A row of attempt a at step s is superseded when a later attempt
of the same node started before s: its start is `resumed_from_step` from its attempt record or
one before the first step it logged, whichever is earlier (table `attempt_spans`). The writer
refuses a step that does not increase within an attempt, so this leaves one row per step.

A node whose identity changed had its folder moved to RUN/superseded/<node>@<tag>/ (trinity.execute.run:
supersede). Its rows stay in `<table>_history`, never in `<table>`: every history row carries `identity`
(the node identity it was written under, from its attempt record, else the folder's status) and
`superseded_folder` (the superseded folder it lies in; NULL for the node's current folder), so the old and the
new variant of a node can be compared in SQL.

A part that cannot be read (a truncated file, a damaged footer) would make every query fail, so
the catalog checks each part's Parquet footer first and leaves a damaged one out of every view:
`on_damaged` hears of it (by default a warning on stderr naming the file), and `strict=True` makes
it a CatalogError naming the file. `trinity verify` checks every part in full and finds gaps.

The SQL entry point (`run_sql`) is read-only twice over: statements that write are refused before
they run (trinity.store.sql), and the connection itself may touch no file but the Parquet parts
it was built from (DuckDB's external access is off, with those files allowed, and the
configuration is locked), so even a statement the check missed cannot write any other file. The
parts themselves are not safe from it: DuckDB's allowed_paths admits writes as well as reads (a
`COPY ... TO '<part>' (USE_TMP_FILE false)` overwrites a part), so the check is what guards them.
The column-by-column reference is docs/telemetry.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trinity.errors import CatalogError
from trinity.run.layout import NodeDir, RunDir
from trinity.store.compaction import current_parts
from trinity.store.run_tables import Run, find_runs, load_run, node_ids, nodes_and_attempts, runs_table, spec_tables
from trinity.store.telemetry import SCHEMAS, TABLES

Format = Literal["table", "csv", "json"]

# Columns (besides run_id, node, attempt) that identify one row of a table within a step.
_ROW_KEY: dict[str, tuple[str, ...]] = {
    "steps": ("step",),
    "moe_layers": ("step", "layer"),
    "expert_load": ("step", "layer", "expert"),
    "evals": ("step", "task", "metric", "length"),
}

ALLOWED_STATEMENTS = {duckdb.StatementType.SELECT: "SELECT", duckdb.StatementType.EXPLAIN: "EXPLAIN"}
ALLOWED_HELP = "SELECT, WITH ... SELECT, FROM ..., VALUES, PIVOT, UNPIVOT, DESCRIBE, SHOW, SUMMARIZE and EXPLAIN"


# -- telemetry views ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One committed Parquet part and the node attempt that wrote it."""

    run_id: str
    node: str
    attempt: int
    path: Path
    footer: Any = field(default=None, compare=False, repr=False)
    """Its Parquet footer (pyarrow FileMetaData) once `usable_parts` has read it, so it is read once."""
    identity: str | None = None
    """The node identity the attempt ran with (its attempt record's, else its folder's status)."""
    superseded: str | None = None
    """The RUN/superseded/ folder holding the part; None for the node's current folder."""


def telemetry_parts(runs: Sequence[Run]) -> dict[str, list[Part]]:
    """Committed Parquet parts in use of every table, over every node attempt of every run.

    A part that a merged part covers (trinity.store.compaction: left by a crash during compaction) is
    not in use: its rows are in the merged part.
    """
    parts: dict[str, list[Part]] = {t: [] for t in TABLES}
    for run in runs:
        folders = [(node_id, RunDir(run.root).node(node_id), None) for node_id in node_ids(run)]
        for node_id, node_dir, moved in folders + superseded_folders(run.root):
            telemetry = node_dir.root / "telemetry"
            if not telemetry.is_dir():
                continue
            status_identity = _identity(node_dir.status)
            for attempt_dir in sorted(telemetry.glob("attempt-*")):
                if not attempt_dir.name[8:].isdigit() or not attempt_dir.is_dir():
                    continue
                attempt = int(attempt_dir.name[8:])
                identity = _identity(node_dir.attempt_record(attempt)) or status_identity
                current, _ = current_parts(attempt_dir)
                for p, name in current.items():
                    part = Part(run.run_id, node_id, attempt, p.resolve(), identity=identity, superseded=moved)
                    parts[name.table].append(part)
    return parts


def superseded_folders(root: Path) -> list[tuple[str, NodeDir, str]]:
    """(node id, folder, folder path) of every node folder moved to RUN/superseded/<node id>@<tag>/."""
    base = root / "superseded"
    if not base.is_dir():
        return []
    found = []
    for status in sorted(base.glob("**/status.json")):
        rel = status.parent.relative_to(base).as_posix()
        if "@" in rel:
            found.append((rel.rsplit("@", 1)[0], NodeDir(status.parent), str(status.parent.resolve())))
    return found


def _identity(record: Path) -> str | None:
    """The `identity` of a JSON record (status.json, an attempt record), or None."""
    try:
        value = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    identity = value.get("identity") if isinstance(value, dict) else None
    return identity if isinstance(identity, str) and identity else None


def _read_footer(path: Path) -> Any:
    """The Parquet footer of `path` (FileMetaData), or why it cannot be read (str)."""
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "step" not in meta.schema.names:
        return "it has no step column"
    return meta


def part_problem(path: Path) -> str | None:
    """Why the Parquet part at `path` cannot be read (its footer: magic, metadata, columns), or None."""
    footer = _read_footer(path)
    return footer if isinstance(footer, str) else None


def warn_damaged(part: Part, problem: str) -> None:
    """The default `on_damaged` of open_catalog: one warning line on stderr naming the file."""
    print(
        f"warning: skipping damaged telemetry part {part.path} ({problem}); its rows are missing from every "
        f"view (`trinity verify` checks all parts; --strict makes this an error)",
        file=sys.stderr,
        flush=True,
    )


def usable_parts(
    parts: dict[str, list[Part]], *, strict: bool, on_damaged: Callable[[Part, str], None]
) -> dict[str, list[Part]]:
    """`parts` without the damaged ones (each reported to `on_damaged`); `strict`: a CatalogError instead."""
    out: dict[str, list[Part]] = {}
    for table, table_parts in parts.items():
        out[table] = []
        for part in table_parts:
            footer = _read_footer(part.path)
            problem = footer if isinstance(footer, str) else None
            if problem is None:
                out[table].append(replace(part, footer=footer))
            elif strict:
                raise CatalogError(f"damaged telemetry part {part.path}: {problem} (without --strict it is skipped)")
            else:
                on_damaged(part, problem)
    return out


def _step_range(path: Path, footer: Any = None) -> tuple[int, int] | None:
    """(min, max) of the step column from the Parquet footer's statistics (the data if they lack them).

    footer: the part's footer if already read (Part.footer)."""
    meta = pq.read_metadata(path) if footer is None else footer
    if meta.num_rows == 0:
        return None
    col = meta.schema.names.index("step")
    lo, hi = [], []
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(col).statistics
        if stats is None or not stats.has_min_max:
            steps = pq.read_table(path, columns=["step"]).column("step")
            return int(pc.min(steps).as_py()), int(pc.max(steps).as_py())
        lo.append(int(stats.min))
        hi.append(int(stats.max))
    return min(lo), max(hi)


SPANS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("node", pa.string()),
        ("attempt", pa.int32()),
        ("resumed_from_step", pa.int64()),
        ("first_step", pa.int64()),
        ("last_step", pa.int64()),
        ("start_step", pa.int64()),
        ("superseded_after", pa.int64()),
    ]
)


def _spans(attempts: pa.Table, step_parts: Sequence[Part]) -> pa.Table:
    """attempt_spans: where each attempt started and after which step a later attempt replaced it.

    start_step = the earlier of resumed_from_step and (first logged step - 1), so an attempt that
    logged a step always supersedes the older rows of that step, whatever its record says.
    superseded_after = the least start_step of the node's later attempts (null: never superseded).
    """
    ranges: dict[tuple[str, str, int], tuple[int, int]] = {}
    for part in step_parts:
        r = _step_range(part.path, part.footer)
        if r is None:
            continue
        key = (part.run_id, part.node, part.attempt)
        old = ranges.get(key)
        ranges[key] = r if old is None else (min(old[0], r[0]), max(old[1], r[1]))
    by_node: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for a in attempts.to_pylist():
        key = (a["run_id"], a["node"], a["attempt"])
        first, last = ranges.get(key, (None, None))
        starts = [v for v in (a["resumed_from_step"], None if first is None else first - 1) if v is not None]
        row = {
            "run_id": a["run_id"],
            "node": a["node"],
            "attempt": a["attempt"],
            "resumed_from_step": a["resumed_from_step"],
            "first_step": first,
            "last_step": last,
            "start_step": min(starts) if starts else None,
        }
        by_node.setdefault((a["run_id"], a["node"]), []).append(row)
    rows = []
    for node_rows in by_node.values():
        node_rows.sort(key=lambda r: r["attempt"])
        for i, row in enumerate(node_rows):
            later = [r["start_step"] for r in node_rows[i + 1 :] if r["start_step"] is not None]
            rows.append(row | {"superseded_after": min(later) if later else None})
    return pa.Table.from_pylist(rows, SPANS_SCHEMA)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _sql_value(s: str | None) -> str:
    return "CAST(NULL AS VARCHAR)" if s is None else _sql_str(s)


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _scan(files: Sequence[Path]) -> str:
    listing = ", ".join(_sql_str(str(f)) for f in files)
    return f"read_parquet([{listing}], union_by_name = true)"


def _create_views(con: duckdb.DuckDBPyConnection, table: str, parts: Sequence[Part], spans: pa.Table) -> None:
    """`<table>_history` (every row, with `identity` and `superseded_folder`) and `<table>` (rows of the node's
    current folder only, those a later attempt replaced left out: each step once).

    Every part belongs to one attempt, so the superseded rows are cut per part with a plain
    `step <= superseded_after` filter that DuckDB pushes into the Parquet scan (no join).
    """
    extra = [pa.field("identity", pa.string()), pa.field("superseded_folder", pa.string())]
    history_schema = pa.schema([*SCHEMAS[table], *extra])
    if not parts:
        con.from_arrow(history_schema.empty_table()).create(f"{table}_history")
        con.execute(f"CREATE VIEW {table} AS SELECT * EXCLUDE (identity, superseded_folder) FROM {table}_history")
        return
    # Every column of SCHEMAS even when no part has it yet (parts older than ADDED_COLUMNS): NULL there.
    con.from_arrow(history_schema.empty_table()).create(f"_{table}_history_columns")
    con.from_arrow(SCHEMAS[table].empty_table()).create(f"_{table}_columns")
    by_folder: dict[tuple[str | None, str | None], list[Path]] = {}
    for p in parts:
        by_folder.setdefault((p.identity, p.superseded), []).append(p.path)
    history = [f"SELECT * FROM _{table}_history_columns"] + [
        f"SELECT *, {_sql_value(identity)} AS identity, {_sql_value(moved)} AS superseded_folder FROM {_scan(files)}"
        for (identity, moved), files in by_folder.items()
    ]
    con.execute(f"CREATE VIEW {table}_history AS " + "\nUNION ALL BY NAME\n".join(history))
    if table not in _ROW_KEY:
        view = f"SELECT * EXCLUDE (identity, superseded_folder) FROM {table}_history WHERE superseded_folder IS NULL"
        con.execute(f"CREATE VIEW {table} AS {view}")
        return
    parts = [p for p in parts if p.superseded is None]
    cutoff = {(r["run_id"], r["node"], r["attempt"]): r["superseded_after"] for r in spans.to_pylist()}
    groups: dict[int | None, list[Path]] = {}
    for p in parts:
        groups.setdefault(cutoff.get((p.run_id, p.node, p.attempt)), []).append(p.path)
    selects = [
        f"SELECT * FROM {_scan(files)}" + ("" if after is None else f" WHERE step <= {int(after)}")
        for after, files in sorted(groups.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))
    ]
    body = "\nUNION ALL BY NAME\n".join([f"SELECT * FROM _{table}_columns", *selects])
    if table in ("steps", "evals"):
        # Small tables: also guarantee one row per key should records disagree with the rows.
        key = ", ".join(("run_id", "node", *_ROW_KEY[table]))
        body = f"SELECT * FROM ({body}) QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY attempt DESC) = 1"
    con.execute(f"CREATE VIEW {table} AS {body}")


def open_catalog(
    path: Path | str,
    *,
    lock: bool = True,
    strict: bool = False,
    on_damaged: Callable[[Part, str], None] = warn_damaged,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection over the run at `path` or every run below it.

    lock: turn off DuckDB's file access except to the telemetry parts and lock the configuration,
    so nothing run on this connection can write a file.
    strict: a damaged telemetry part is a CatalogError naming it; otherwise it is left out of the
    views and reported to `on_damaged` (default: a warning on stderr).
    """
    runs = [load_run(r) for r in find_runs(Path(path))]
    seen: dict[str, Path] = {}
    for r in runs:
        if r.run_id in seen:
            raise CatalogError(f"run id {r.run_id!r} appears twice: {seen[r.run_id]} and {r.root}")
        seen[r.run_id] = r.root
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    runs_t = runs_table(runs)
    nodes_t, attempts_t = nodes_and_attempts(runs)
    spec_t, spec_fields_t = spec_tables(runs)
    for name, arrow in (("runs", runs_t), ("nodes", nodes_t), ("attempts", attempts_t), ("spec_fields", spec_fields_t)):
        con.from_arrow(arrow).create(name)
    # spec: the dotted columns, then a '__' spelling of each for queries that avoid quoting.
    con.from_arrow(spec_t).create("spec_dotted")
    extra = [
        f"{_ident(c)} AS {_ident(c.replace('.', '__'))}"
        for c in spec_t.column_names
        if "." in c and c.replace(".", "__") not in spec_t.column_names
    ]
    con.execute(f"CREATE TABLE spec AS SELECT *{''.join(', ' + e for e in extra)} FROM spec_dotted")
    con.execute("DROP TABLE spec_dotted")
    parts = usable_parts(telemetry_parts(runs), strict=strict, on_damaged=on_damaged)
    spans = _spans(attempts_t, [p for p in parts["steps"] if p.superseded is None])
    con.from_arrow(spans).create("attempt_spans")
    for table in TABLES:
        _create_views(con, table, parts[table], spans)
    if lock:
        allowed = ", ".join(_sql_str(str(p.path)) for ps in parts.values() for p in ps)
        con.execute(f"SET allowed_paths = [{allowed}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con
