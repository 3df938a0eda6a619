"""Read-only SQL over the catalog: what `trinity sql` accepts, runs and prints.

One read statement at a time (SELECT, WITH ... SELECT, FROM, VALUES, PIVOT, UNPIVOT, DESCRIBE,
SHOW, SUMMARIZE, EXPLAIN); anything that writes is refused, and the connection itself can open
no file but the telemetry parts (`open_catalog(lock=True)`). DuckDB would let it write those parts
(allowed_paths admits writes), so this check is what keeps `COPY ... TO '<part>'` out.

The check asks DuckDB's own parser for the statement's type. One read is not a single statement
there: a PIVOT that takes its column values from the data (`PIVOT moe_layers ON layer USING
max(max_vio)`, no IN list) parses as a MULTI statement, since DuckDB first collects the values
into an enum type (in the connection's temporary catalog) and then runs the query. The same MULTI
type also hides `COPY (PIVOT ...) TO` or `CREATE TABLE AS PIVOT ...`, so the parser alone cannot
tell; such a statement is judged by its physical plan on the catalog it would run on (EXPLAIN),
which must hold no operator that writes (WRITE_OPERATORS).

A query runs under a time limit (`timeout_s`, default DEFAULT_TIMEOUT_S; None or 0: none): a
threading.Timer calls DuckDB's `interrupt()` on the connection when it expires, and the query ends
in a CatalogError that names the limit. A damaged telemetry part is skipped with a warning naming
it, or with `strict` is an error (trinity.store.catalog.usable_parts).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from trinity.errors import CatalogError, ReadOnlyViolation
from trinity.store.catalog import ALLOWED_HELP, ALLOWED_STATEMENTS, Format, Part, open_catalog, warn_damaged

DEFAULT_TIMEOUT_S = 300.0
"""`trinity sql`'s time limit per query: ample for any query over a run's telemetry, and a runaway
join (a cross product of two large views) ends instead of running for hours. --timeout 0: none."""


WRITE_OPERATORS = frozenset(
    {
        "INSERT", "BATCH_INSERT", "DELETE", "UPDATE", "MERGE_INTO",
        "COPY_TO_FILE", "BATCH_COPY_TO_FILE", "COPY_DATABASE", "EXPORT",
        "CREATE_TABLE", "CREATE_TABLE_AS", "BATCH_CREATE_TABLE_AS", "CREATE_INDEX", "CREATE_SEQUENCE",
        "CREATE_VIEW", "CREATE_SCHEMA", "CREATE_MACRO", "CREATE_TYPE", "CREATE_SECRET", "ALTER", "DROP",
        "ATTACH", "DETACH", "SET", "SET_VARIABLE", "RESET", "LOAD", "PRAGMA", "VACUUM", "TRANSACTION",
        "PREPARE", "EXECUTE", "EXTENSION", "UPDATE_EXTENSIONS",
    }
)  # fmt: skip
"""DuckDB's physical operators (PhysicalOperatorType names) that change a database, a file or the
session: a statement whose plan holds one of them is refused."""

_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:ANALYZE\s+|\([^)]*\)\s*)?(.*)$", re.S | re.I)


def _refuse(verb: str) -> ReadOnlyViolation:
    return ReadOnlyViolation(f"trinity sql is read-only: {verb} statements are refused (allowed: {ALLOWED_HELP})")


def _plan_operators(con: duckdb.DuckDBPyConnection, query: str) -> list[str]:
    """The operator names of `query`'s physical plan on `con`, root first (EXPLAIN runs nothing)."""
    try:
        rows = con.execute(f"EXPLAIN (FORMAT json) {query}").fetchall()
    except duckdb.PermissionException as exc:  # planning a COPY TO (or a read of another file) opens it
        raise ReadOnlyViolation(
            f"trinity sql is read-only and opens no file but the run's telemetry: {str(exc).splitlines()[0]}"
        ) from None
    except duckdb.Error as exc:
        raise CatalogError(f"query failed: {exc}") from None
    names: list[str] = []
    todo: list[Any] = [node for row in rows for node in json.loads(row[1])]
    while todo:
        node = todo.pop(0)
        names.append(str(node.get("name", "")))
        todo.extend(node.get("children", []))
    return names


def check_read_only(query: str, con: duckdb.DuckDBPyConnection | None = None) -> None:
    """Raise ReadOnlyViolation unless `query` is exactly one read statement.

    `con` is the catalog the query will run on: a MULTI statement (a PIVOT without an IN list) is
    checked by its plan there. Without `con` such a statement passes, so `query()` checks twice:
    before opening the catalog (a plain write is refused at once) and on the open catalog.
    """
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise CatalogError(f"cannot parse the query: {exc}") from None
    if not statements:
        raise CatalogError("the query is empty")
    if len(statements) > 1:
        raise CatalogError(f"give one statement at a time (got {len(statements)})")
    st = statements[0]
    explained = _EXPLAIN.match(st.query)
    if st.type == duckdb.StatementType.MULTI:
        if explained is not None:  # EXPLAIN [ANALYZE] of a PIVOT: check what it explains
            check_read_only(explained.group(1), con)
        elif con is not None:
            writes = [op for op in _plan_operators(con, st.query) if op in WRITE_OPERATORS]
            if writes:
                raise _refuse(writes[0].removeprefix("BATCH_").split("_")[0])
        return
    if st.type not in ALLOWED_STATEMENTS:
        kind = str(st.type).rsplit(".", 1)[-1]
        raise _refuse(st.query.strip().split(None, 1)[0].upper() if st.query.strip() else kind)
    if st.type == duckdb.StatementType.EXPLAIN and explained is not None:
        # EXPLAIN ANALYZE runs its statement: check what it explains.
        check_read_only(explained.group(1), con)


def query(
    path: Path | str,
    sql: str,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    strict: bool = False,
    on_damaged: Callable[[Part, str], None] = warn_damaged,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of a read-only query over the run(s) at `path`, stopped after `timeout_s`
    seconds (None or 0: no limit). `strict`: a damaged telemetry part is an error, not skipped."""
    check_read_only(sql)
    con = open_catalog(path, strict=strict, on_damaged=on_damaged)
    timer = threading.Timer(timeout_s, con.interrupt) if timeout_s else None
    try:
        check_read_only(sql, con)
        if timer is not None:
            timer.daemon = True
            timer.start()
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description or []]
        return names, cursor.fetchall()
    except duckdb.InterruptException:
        raise CatalogError(
            f"the query was stopped at its time limit of {timeout_s:g} s (--timeout SECONDS raises it; 0: no limit)"
        ) from None
    except duckdb.Error as exc:
        raise CatalogError(f"query failed: {exc}") from None
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def _plain(value: Any) -> Any:
    """A JSON-able Python value (timestamps as ISO 8601, NaN as null)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


def _csv_cell(value: Any) -> Any:
    """Full precision (floats as repr), lists and structs as JSON, null as an empty field."""
    plain = _plain(value)
    if plain is None:
        return ""
    return json.dumps(plain) if isinstance(plain, list | dict) else plain


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(_plain(value))


def format_rows(
    names: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    fmt: Format,
    *,
    max_rows: int = 1000,
    width: int | None = None,
) -> str:
    """Rows as an aligned table (at most `max_rows`), CSV with a header, or a JSON list of objects."""
    if fmt == "json":
        return json.dumps([{n: _plain(v) for n, v in zip(names, row, strict=True)} for row in rows], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(names)
        w.writerows([[_csv_cell(v) for v in row] for row in rows])
        return out.getvalue()
    if fmt != "table":
        raise CatalogError(f"unknown format {fmt!r} (choose table, csv or json)")
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for n in names:
        table.add_column(escape(n), overflow="fold")
    for row in rows[:max_rows]:
        table.add_row(*(escape(_cell(v)) for v in row))  # node ids hold [branch] labels, not markup
    more = len(rows) - max_rows
    note = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    note += f"; first {max_rows} shown (use --format csv for all)" if more > 0 else ""
    out = io.StringIO()
    console = Console(file=out, width=width or 200, color_system=None, force_terminal=False)
    console.print(table)
    console.print(note, highlight=False)
    return out.getvalue()


def run_sql(
    path: Path | str,
    sql: str,
    fmt: Format = "table",
    *,
    max_rows: int = 1000,
    width: int | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    strict: bool = False,
) -> str:
    """The text `trinity sql PATH QUERY --format FMT` prints (ReadOnlyViolation for a write)."""
    names, rows = query(path, sql, timeout_s=timeout_s, strict=strict)
    return format_rows(names, rows, fmt, max_rows=max_rows, width=width)
