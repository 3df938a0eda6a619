"""`trinity sql RUN --duckdb OUT.duckdb`: the catalog as a DuckDB database file other tools open.

`open_catalog` builds its tables and views in memory for each query. The same catalog written to a
file lets the DuckDB CLI, Python (`duckdb.connect("OUT.duckdb", read_only=True)`) or a BI tool
query the telemetry directly, with the same names as `trinity sql` (docs/telemetry.md).

What the file holds: the metadata tables (runs, nodes, attempts, spec, spec_fields,
attempt_spans) copied as they were at export time, and the telemetry views (steps,
steps_history, moe_layers, ...) as view definitions over the Parquet parts by absolute path, so
the file stays small and the rows are read from the run directory when queried. The part list and
the attempt records are a snapshot: parts committed after the export are not in the views
(export again to see them), and moving the run directory breaks the views. Timestamps are
TIMESTAMP WITH TIME ZONE; a client shows them in its own time zone (`trinity sql` uses UTC).

The file is written next to OUT under a temporary name and renamed into place when complete, so a
reader never opens half a database and an existing OUT is replaced whole.

The file is written in DuckDB's storage format of v1.2 (`STORAGE_VERSION`), not the newest one the
installed Python package writes: the DuckDB CLI and other clients are often older than it (the
`duckdb-cli` package on PyPI reads formats up to its own version), and a file in a newer format is refused
by them outright ("created with a newer version of DuckDB").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import duckdb

from trinity.errors import CatalogError
from trinity.store.catalog import Part, open_catalog, warn_damaged

STORAGE_VERSION = "v1.2.0"
"""The oldest DuckDB release whose clients open the file (every type and view the catalog holds exists there)."""


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def write_duckdb(
    path: Path | str,
    out: Path | str,
    *,
    strict: bool = False,
    on_damaged: Callable[[Part, str], None] = warn_damaged,
) -> list[str]:
    """Write the catalog of the run(s) at `path` to the DuckDB file `out`; the names of its tables and views."""
    out = Path(out)
    if out.is_dir():
        raise CatalogError(f"--duckdb {out}: is a directory; give a file name such as {out / 'telemetry.duckdb'}")
    if not out.parent.is_dir():
        raise CatalogError(f"--duckdb {out}: the folder {out.parent} does not exist; create it first")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = open_catalog(path, lock=False, strict=strict, on_damaged=on_damaged)
    try:
        (source,) = con.execute("SELECT current_database()").fetchone() or ("memory",)
        con.execute(f"ATTACH {_sql_str(str(tmp))} AS trinity_export (STORAGE_VERSION '{STORAGE_VERSION}')")
        con.execute(f'COPY FROM DATABASE "{source}" TO trinity_export')
        rows = con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'trinity_export' "
            "AND table_name NOT LIKE '\\_%' ESCAPE '\\' ORDER BY table_name"
        ).fetchall()
        con.execute("DETACH trinity_export")
    except duckdb.Error as exc:
        tmp.unlink(missing_ok=True)
        raise CatalogError(f"--duckdb {out}: cannot write the database: {exc}") from None
    finally:
        con.close()
    os.replace(tmp, out)
    return [r[0] for r in rows]
