"""The catalog: resume semantics, spec joins across a sweep, metadata tables, a connection that cannot write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from trinity.errors import CatalogError
from trinity.run.layout import RunDir
from trinity.store.catalog import open_catalog
from trinity.store.sql import query

P1 = "pretrain/phase1"


def test_resume_supersedes_rows_beyond_the_restored_step(resumed_run: RunDir) -> None:
    con = open_catalog(resumed_run.root)
    rows = con.execute("SELECT step, attempt, loss FROM steps WHERE node = ? ORDER BY step", [P1]).fetchall()
    assert [r[0] for r in rows] == list(range(1, 13))
    assert [r[1] for r in rows] == [1] * 6 + [2] * 6
    assert rows[7][2] == pytest.approx(10 / 8 + 2 / 1000)  # attempt 2's value, not attempt 1's
    assert con.execute("SELECT count(*) FROM steps_history").fetchone() == (10 + 6,)
    assert con.execute("SELECT count(*) FROM steps_history WHERE attempt = 1 AND step > 6").fetchone() == (4,)
    # the per-layer tables follow the same rule
    assert con.execute("SELECT count(*), count(DISTINCT (step, layer)) FROM moe_layers").fetchone() == (36, 36)
    assert con.execute("SELECT max(attempt) FROM moe_layers WHERE step > 6").fetchone() == (2,)
    assert con.execute("SELECT count(*) FROM moe_layers_history").fetchone() == ((10 + 6) * 3,)
    assert con.execute("SELECT DISTINCT step FROM expert_load ORDER BY step").fetchall() == [
        (s,) for s in range(2, 13, 2)
    ]
    assert con.execute("SELECT attempt, count(*) FROM expert_load GROUP BY attempt ORDER BY 1").fetchall() == [
        (1, 3 * 3 * 8),
        (2, 3 * 3 * 8),
    ]
    spans = con.execute("SELECT attempt, start_step, superseded_after FROM attempt_spans ORDER BY 1").fetchall()
    assert spans == [(1, 0, 6), (2, 6, None)]


def test_a_resumed_attempt_that_died_early_still_supersedes(
    tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None]
) -> None:
    """Attempt 2 restored step 6 and logged only step 7: attempt 1's 8..10 are no longer the run's history."""
    run = make_run(tmp_path / "r", "r", [(P1, "pretrain", {})])
    write_attempt(run, "r", P1, 1, range(1, 11), state="FAILED")
    write_attempt(run, "r", P1, 2, [7], resumed_from_step=6, state="FAILED")
    con = open_catalog(run.root)
    assert con.execute("SELECT step, attempt FROM steps ORDER BY step").fetchall() == [
        *[(s, 1) for s in range(1, 7)],
        (7, 2),
    ]


def test_without_resumed_from_step_the_first_logged_step_marks_the_restart(
    tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None]
) -> None:
    run = make_run(tmp_path / "r", "r", [(P1, "pretrain", {})])
    write_attempt(run, "r", P1, 1, range(1, 11), state="FAILED")
    write_attempt(run, "r", P1, 2, range(5, 9), record=False)  # no attempts/0002.json
    write_attempt(run, "r", P1, 3, range(1, 4), resumed_from_step=None)  # a fresh start (from step 0)
    con = open_catalog(run.root)
    assert con.execute("SELECT step, attempt FROM steps ORDER BY step").fetchall() == [(s, 3) for s in range(1, 4)]
    assert con.execute("SELECT attempt, has_record FROM attempts ORDER BY 1").fetchall() == [
        (1, True),
        (2, False),
        (3, True),
    ]
    assert con.execute("SELECT count(*) FROM steps_history").fetchone() == (17,)


def test_max_vio_of_every_moe_layer_at_the_last_step(resumed_run: RunDir) -> None:
    sql = """
        SELECT node, layer, max_vio, dead_experts FROM moe_layers m
        WHERE step = (SELECT max(step) FROM steps s WHERE s.run_id = m.run_id AND s.node = m.node)
        ORDER BY node, layer
    """
    names, rows = query(resumed_run.root, sql)
    assert names == ["node", "layer", "max_vio", "dead_experts"]
    assert [(r[0], r[1]) for r in rows] == [(P1, 0), (P1, 1), (P1, 2)]
    assert all(r[2] > 0 for r in rows) and rows[0][3] >= 1  # conftest routes no token to expert 0 of layer 0
    # the same number as the expert_load rows of that step give
    (vio,) = query(
        resumed_run.root,
        "SELECT (max(tokens) - avg(tokens)) / avg(tokens) FROM expert_load WHERE step = 12 AND layer = 0",
    )[1][0]
    assert vio == pytest.approx(rows[0][2])


def test_sweep_joins_loss_with_spec_fields(
    tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None]
) -> None:
    root = tmp_path / "runs"
    for name, n_experts, offset in (("sweep-e8", 8, 0.5), ("sweep-e16", 16, 0.0)):
        run = make_run(root / "2025" / name, name, [(P1, "pretrain", {"model.moe.n_experts": n_experts})])
        write_attempt(run, name, P1, 1, range(1, 6), loss_offset=offset)
    sql = """
        SELECT p."model.moe.n_experts" AS n_experts, p.model__moe__n_experts AS again, s.loss
        FROM steps s JOIN spec p USING (run_id, node)
        WHERE s.step = 5 ORDER BY n_experts
    """
    _, rows = query(root, sql)
    assert [r[:2] for r in rows] == [(8, 8), (16, 16)]
    assert rows[0][2] == pytest.approx(2.0 + 0.5 + 0.001) and rows[1][2] == pytest.approx(2.001)
    con = open_catalog(root)
    assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE spec)").fetchall())
    assert types["model.moe.n_experts"] == "BIGINT"
    assert types["stability.z_loss_weight"] == "DOUBLE"
    assert types["model.tie_embeddings"] == "BOOLEAN"
    assert types["stability.balancing.kind"] == "VARCHAR"
    assert con.execute('SELECT DISTINCT "optim.adamw.betas" FROM spec').fetchall() == [("[0.9, 0.95]",)]
    long = con.execute("SELECT value FROM spec_fields WHERE path = 'model.moe.n_experts' ORDER BY value").fetchall()
    assert long == [("16",), ("8",)]


def test_the_connection_itself_cannot_write_files(resumed_run: RunDir, tmp_path: Path) -> None:
    """Defence in depth: even a statement that slipped past the check could not touch the disk."""
    con = open_catalog(resumed_run.root)
    target = tmp_path / "leak.csv"
    with pytest.raises(Exception, match="disabled by configuration"):
        con.execute(f"COPY (SELECT 1) TO '{target}'")
    with pytest.raises(Exception, match="locked"):
        con.execute("SET enable_external_access = true")
    assert not target.exists()


def test_metadata_tables(resumed_run: RunDir) -> None:
    con = open_catalog(resumed_run.root)
    assert con.execute("SELECT run_id, name, trinity_version, n_nodes FROM runs").fetchall() == [
        ("r1", "r1", "0.1.0", 2)
    ]
    nodes = con.execute("SELECT node, kind, deps, state, n_attempts, position FROM nodes ORDER BY position").fetchall()
    assert nodes == [(P1, "pretrain", [], "SUCCEEDED", 2, 0), ("pretrain/phase2", "pretrain", [P1], "PENDING", 0, 1)]
    a = con.execute("SELECT attempt, state, resumed_from_step, duration_s FROM attempts ORDER BY 1").fetchall()
    assert a == [(1, "FAILED", None, 60.0), (2, "SUCCEEDED", 6, 60.0)]
    # tables no node wrote yet exist, typed and empty
    assert con.execute("SELECT count(*), typeof(any_value(score)) FROM evals").fetchone()[0] == 0
    assert "score" in [r[0] for r in con.execute("DESCRIBE evals").fetchall()]


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no run directories"):
        open_catalog(tmp_path)
    with pytest.raises(CatalogError, match="no such directory"):
        open_catalog(tmp_path / "missing")
    deep = tmp_path / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "graph.json").write_text('{"nodes": []}')
    with pytest.raises(CatalogError, match="up to 3 levels"):
        open_catalog(tmp_path)
    assert open_catalog(tmp_path / "a").execute("SELECT count(*) FROM runs").fetchone() == (1,)
