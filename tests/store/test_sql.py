"""The read-only SQL entry point (`trinity sql`): what it refuses, its output formats, and the queries of
docs/guide.md on a real run of the micro graph."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.cli_runs import trinity
from tests.conftest import ROOT
from trinity.errors import CatalogError, ReadOnlyViolation
from trinity.run.layout import RunDir
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
