"""The read-only SQL entry point (`trinity sql`): what it refuses, its output formats, and the queries of
docs/guide.md on a real run of the micro graph."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from tests.cli_runs import trinity
from tests.conftest import ROOT
from trinity.cli import app
from trinity.errors import CatalogError, ReadOnlyViolation
from trinity.run.layout import RunDir
from trinity.store.duckdb_file import write_duckdb
from trinity.store.sql import query, run_sql


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE steps",
        "INSERT INTO runs (run_id) VALUES ('x')",
        "COPY steps TO 'out.csv'",
        "ATTACH 'other.duckdb' AS other",
        "CREATE TABLE t AS SELECT 1",
        "UPDATE runs SET name = 'x'",
        "DELETE FROM runs",
        "SET threads = 1",
        "INSTALL httpfs",
        "EXPLAIN ANALYZE DELETE FROM runs",
        "SELECT 1; DROP TABLE steps",
    ],
)
def test_writes_are_refused(resumed_run: RunDir, sql: str) -> None:
    with pytest.raises(CatalogError) as exc:
        run_sql(resumed_run.root, sql)
    if ";" not in sql:
        assert isinstance(exc.value, ReadOnlyViolation)
        verb = sql.split()[0] if not sql.startswith("EXPLAIN") else "DELETE"
        assert str(exc.value).startswith(f"trinity sql is read-only: {verb} statements are refused (allowed: SELECT")
    assert not list(resumed_run.root.glob("*.csv")) and not list(resumed_run.root.glob("*.duckdb"))


def test_output_formats(resumed_run: RunDir) -> None:
    sql = "SELECT step, loss, phase, time FROM steps WHERE node = 'pretrain/phase1' ORDER BY step LIMIT 2"
    rows = json.loads(run_sql(resumed_run.root, sql, "json"))
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["phase"] == "phase1"
    assert rows[0]["time"].endswith("+00:00")
    csv_text = run_sql(resumed_run.root, sql, "csv")
    assert csv_text.splitlines()[0] == "step,loss,phase,time" and len(csv_text.splitlines()) == 3
    assert float(csv_text.splitlines()[1].split(",")[1]) == rows[0]["loss"]  # full precision
    table = run_sql(resumed_run.root, sql, "table")
    assert "loss" in table and "phase1" in table and "2 rows" in table
    reads = ["DESCRIBE steps", "SHOW TABLES", "SUMMARIZE steps", "EXPLAIN SELECT * FROM steps", "FROM runs"]
    for read in reads:
        assert run_sql(resumed_run.root, read, "csv")


def test_the_guides_queries_run_as_written(straight_run: Path) -> None:
    """Every ```sql block of docs/guide.md answers on a real run (and returns rows)."""
    guide = (ROOT / "docs" / "guide.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", guide, flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        names, rows = query(straight_run, block)
        assert names and rows, block


def test_sql_cli_answers_and_refuses_writes(straight_run: Path) -> None:
    ok = trinity(
        "sql",
        str(straight_run),
        "SELECT layer, max_vio FROM moe_layers WHERE step = 59 ORDER BY layer",
        "--format",
        "json",
    )
    assert ok.returncode == 0, ok.stderr
    rows = json.loads(ok.stdout)
    assert [r["layer"] for r in rows] == [0, 1, 2] and all(r["max_vio"] >= 0 for r in rows)
    for statement in ("DROP TABLE steps", "INSERT INTO steps SELECT * FROM steps", "COPY steps TO 'x.csv'"):
        refused = trinity("sql", str(straight_run), statement)
        assert refused.returncode == 2 and "read-only" in refused.stderr, statement


# -- damaged telemetry parts and runaway queries ------------------------------------------------------


def _truncate(part: Path) -> None:
    """Cut a part short, as a full disk or a copy that stopped would (the footer is gone)."""
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])


def _steps_parts(run: RunDir, attempt: int) -> list[Path]:
    return sorted(run.node("pretrain/phase1").telemetry(attempt).glob("steps-*.parquet"))


def test_a_truncated_part_is_skipped_with_a_warning_naming_it(
    resumed_run: RunDir, capsys: pytest.CaptureFixture[str]
) -> None:
    part = _steps_parts(resumed_run, 1)[1]  # steps 5..8 of attempt 1 (4 rows per part)
    _truncate(part)
    assert query(resumed_run.root, "SELECT 1")[1] == [(1,)]
    _, rows = query(resumed_run.root, "SELECT step FROM steps_history WHERE attempt = 1 ORDER BY step")
    assert [r[0] for r in rows] == [1, 2, 3, 4, 9, 10]  # only the damaged part's rows are missing
    err = capsys.readouterr().err
    assert err.count("warning: skipping damaged telemetry part") == 2 and str(part.resolve()) in err
    with pytest.raises(CatalogError, match=rf"damaged telemetry part {part.resolve()}: "):
        query(resumed_run.root, "SELECT 1", strict=True)


def test_sql_cli_warns_of_a_damaged_part_and_strict_refuses(resumed_run: RunDir) -> None:
    part = _steps_parts(resumed_run, 2)[0]
    _truncate(part)
    ok = trinity("sql", str(resumed_run.root), "SELECT count(*) AS n FROM steps_history", "--format", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == [{"n": 16 - 4}] and f"skipping damaged telemetry part {part.resolve()}" in ok.stderr
    strict = trinity("sql", str(resumed_run.root), "SELECT 1", "--strict")
    assert strict.returncode == 2 and f"damaged telemetry part {part.resolve()}" in strict.stderr
    assert strict.stdout == ""


def test_a_query_past_its_time_limit_is_stopped(resumed_run: RunDir) -> None:
    runaway = "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b"  # 10^12 rows
    with pytest.raises(CatalogError, match=r"stopped at its time limit of 0.5 s"):
        query(resumed_run.root, runaway, timeout_s=0.5)
    cli = trinity("sql", str(resumed_run.root), runaway, "--timeout", "1")
    assert cli.returncode == 2 and "stopped at its time limit of 1 s" in cli.stderr, cli.stderr
    assert query(resumed_run.root, "SELECT 42", timeout_s=0)[1] == [(42,)]  # 0: no limit


# -- read-only statements DuckDB parses as several (PIVOT), and the catalog as a DuckDB file -------------------


def test_a_pivot_is_a_read_and_matches_the_long_form(resumed_run: RunDir) -> None:
    """`trinity sql RUN "PIVOT ..."` (MaxVio as step x layer) answers, with the values of the long form."""
    pivot = "PIVOT moe_layers ON layer USING max(max_vio) GROUP BY step ORDER BY step"
    cli = trinity("sql", str(resumed_run.root), pivot, "--format", "json")
    assert cli.returncode == 0, cli.stderr
    _, long_rows = query(resumed_run.root, "SELECT step, layer, max_vio FROM moe_layers")
    expected: dict[int, dict[str, float]] = {}
    for step, layer, max_vio in long_rows:
        expected.setdefault(step, {"step": step})[str(layer)] = max_vio
    assert json.loads(cli.stdout) == [expected[s] for s in sorted(expected)] and len(expected) == 12
    for read in (
        "EXPLAIN PIVOT steps ON attempt USING max(loss)",
        "EXPLAIN ANALYZE PIVOT steps ON attempt USING max(loss)",
        "WITH p AS (PIVOT steps ON attempt USING max(loss) GROUP BY step) SELECT count(*) FROM p",
        "UNPIVOT (SELECT step, loss, grad_norm FROM steps) ON loss, grad_norm INTO NAME k VALUE v",
    ):
        assert query(resumed_run.root, read)[1], read


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE t AS PIVOT steps ON attempt USING max(loss)",
        "CREATE TEMP TABLE t AS PIVOT steps ON attempt USING max(loss)",
        "INSERT INTO spec_fields SELECT * FROM spec_fields WHERE EXISTS (PIVOT steps ON attempt USING max(loss))",
        "DELETE FROM runs USING (PIVOT steps ON attempt USING max(loss)) p",
        "COPY (PIVOT steps ON attempt USING max(loss)) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",
        "EXPLAIN ANALYZE COPY (PIVOT steps ON attempt USING max(loss)) TO '{root}/out.csv'",
    ],
)
def test_a_write_holding_a_pivot_is_refused(resumed_run: RunDir, sql: str) -> None:
    """DuckDB parses these like a PIVOT read (one MULTI statement); each is refused and writes nothing."""
    part = _steps_parts(resumed_run, 1)[0]
    before = part.read_bytes()
    with pytest.raises(ReadOnlyViolation, match=r"^trinity sql is read-only"):
        query(resumed_run.root, sql.format(part=part, root=resumed_run.root))
    assert part.read_bytes() == before and not list(resumed_run.root.glob("*.csv"))
    assert query(resumed_run.root, "SELECT count(*) FROM runs")[1] == [(1,)]


def test_duckdb_export_opens_in_plain_duckdb(
    resumed_run: RunDir, write_attempt: Callable[..., None], tmp_path: Path
) -> None:
    """`trinity sql RUN --duckdb OUT.duckdb`: DuckDB alone (read-only) answers as `trinity sql` does."""
    (tmp_path / "export").mkdir()
    out = tmp_path / "export" / "telemetry.duckdb"
    cli = trinity("sql", str(resumed_run.root), "--duckdb", str(out))
    assert cli.returncode == 0 and f"wrote {out}" in cli.stderr, cli.stderr
    checks = [
        "SELECT node, attempt, step, loss FROM steps ORDER BY node, step",
        "SELECT attempt, step FROM steps_history ORDER BY attempt, step",
        "SELECT layer, expert, count(*) AS n FROM expert_load GROUP BY ALL ORDER BY ALL",
        "SELECT node, attempt, state FROM attempts ORDER BY ALL",
        "SELECT attempt, start_step, superseded_after FROM attempt_spans ORDER BY ALL",
    ]
    con = duckdb.connect(str(out), read_only=True)
    try:
        for sql in checks:
            assert con.execute(sql).fetchall() == query(resumed_run.root, sql)[1], sql
        assert con.execute("SELECT count(*) FROM steps_history").fetchall() == [(16,)]
    finally:
        con.close()
    # The DuckDB CLI (the duckdb-cli package, often older than the Python package that wrote the file) opens
    # it too: the file is in the v1.2 storage format, not the writer's newest.
    cli_bin = shutil.which("duckdb")
    assert cli_bin, "the DuckDB CLI (pip package duckdb-cli, a dev dependency) is not installed"
    sql = "SELECT node, attempt, step, loss FROM steps ORDER BY node, step"
    shell = subprocess.run([cli_bin, "-readonly", "-csv", str(out), sql], capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    rows = [line.split(",") for line in shell.stdout.splitlines()[1:]]
    expected = query(resumed_run.root, sql)[1]
    assert [(r[0], int(r[1]), int(r[2]), float(r[3])) for r in rows] == expected
    # Export again over the file after another attempt: replaced whole, and the new rows are in.
    write_attempt(resumed_run, "r1", "pretrain/phase1", 3, range(13, 15), resumed_from_step=12)
    assert "steps" in write_duckdb(resumed_run.root, out)
    con = duckdb.connect(str(out), read_only=True)
    try:
        assert con.execute("SELECT max(step), count(*) FROM steps_history").fetchall() == [(14, 18)]
    finally:
        con.close()
    assert [p.name for p in out.parent.iterdir()] == ["telemetry.duckdb"]  # no temporary left behind
    neither = CliRunner().invoke(app, ["sql", str(resumed_run.root)])
    assert neither.exit_code == 2 and "--duckdb OUT.duckdb" in neither.output
