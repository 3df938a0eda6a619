"""`trinity plot FOLDER --compare "GLOB or SQL"`: the chosen runs' training nodes on one axis per stage kind,
each line labelled `RUN: NODE`. The command runs as a user types it (the CLI, in this process so the figures
can be caught as they are saved), and every drawn line is read back and compared with a DuckDB query of the
same folder: the line's points are exactly that run's and node's rows, and no other run is drawn."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from tests.store.conftest import P1
from trinity.cli import app
from trinity.run.layout import RunDir
from trinity.store.catalog import open_catalog

P2 = "pretrain/phase2[muon.lr=0.02]"
"""A branch of a sweep: its label must survive into the legend."""


@pytest.fixture
def runs(tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None]) -> Path:
    """runs/lr-a (phase 1), runs/lr-b (phase 1 and a branch of phase 2, other losses), runs/other (phase 1)."""
    folder = tmp_path / "runs"
    a = make_run(folder / "lr-a", "id-a", [("tokenizer", "tokenizer", {}), (P1, "pretrain", {})])
    write_attempt(a, "id-a", P1, 1, range(1, 13))
    b = make_run(folder / "lr-b", "id-b", [("tokenizer", "tokenizer", {}), (P1, "pretrain", {}), (P2, "pretrain", {})])
    write_attempt(b, "id-b", P1, 1, range(1, 9), loss_offset=0.5)
    write_attempt(b, "id-b", P2, 1, range(1, 6), loss_offset=-0.3, phase="phase2")
    other = make_run(folder / "other", "id-o", [(P1, "pretrain", {})])
    write_attempt(other, "id-o", P1, 1, range(1, 4), loss_offset=2.0)
    return folder


def _lines(fig: Figure) -> dict[str, tuple[list[float], list[float]]]:
    """gid -> (x, y) of every drawn line, asserting its legend text is its gid."""
    found = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            assert line.get_label() == line.get_gid()
            x, y = np.asarray(line.get_xdata(), dtype=np.float64), np.asarray(line.get_ydata(), dtype=np.float64)
            found[str(line.get_gid())] = ([float(v) for v in x], [float(v) for v in y])
        legend = ax.get_legend()
        assert legend is not None and sorted(t.get_text() for t in legend.get_texts()) == sorted(
            str(line.get_gid()) for line in ax.get_lines()
        )
    return found


def _expected(folder: Path, sql: str, names: dict[str, str]) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (x, y) from SQL over the folder's catalog; `sql` returns run_id, node, x, y ordered by step."""
    con = open_catalog(folder)
    try:
        out: dict[str, tuple[list[float], list[float]]] = {}
        for run_id, node, x, y in con.sql(sql).fetchall():
            xs, ys = out.setdefault(f"{names[run_id]}: {node}", ([], []))
            xs.append(float(x))
            ys.append(float(y))
        return out
    finally:
        con.close()


NAMES = {"id-a": "lr-a", "id-b": "lr-b", "id-o": "other"}


def test_compare_by_glob_draws_each_matching_runs_training_nodes_as_sql_holds_them(
    runs: Path, tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    result = CliRunner().invoke(app, ["plot", str(runs), "--compare", "lr-*", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert sorted(drawn) == ["compare-loss.png", "compare-max_vio.png"]
    loss = _lines(drawn["compare-loss.png"])
    expected = _expected(
        runs, "SELECT run_id, node, tokens, loss FROM steps WHERE run_id <> 'id-o' ORDER BY run_id, node, step", NAMES
    )
    assert sorted(loss) == sorted(["lr-a: pretrain/phase1", "lr-b: pretrain/phase1", f"lr-b: {P2}"])
    assert loss == expected
    max_vio = _lines(drawn["compare-max_vio.png"])
    expected = _expected(
        runs,
        "SELECT run_id, node, step, avg(max_vio) FROM moe_layers WHERE run_id <> 'id-o' "
        "GROUP BY run_id, node, step ORDER BY run_id, node, step",
        NAMES,
    )
    assert sorted(max_vio) == sorted(expected)
    for label, (x, y) in max_vio.items():
        assert x == expected[label][0] and np.allclose(y, expected[label][1])
    fig = drawn["compare-loss.png"]
    colours = {ln.get_gid(): ln.get_color() for ax in fig.axes for ln in ax.get_lines()}
    assert colours["lr-b: pretrain/phase1"] == colours[f"lr-b: {P2}"] != colours["lr-a: pretrain/phase1"]  # per run


def test_compare_by_sql_draws_the_runs_and_nodes_it_returns(
    runs: Path, tmp_path: Path, drawn: dict[str, Figure]
) -> None:
    query = "SELECT run_id, node FROM steps GROUP BY ALL HAVING max(loss) > 6 AND node NOT LIKE '%phase2%'"
    result = CliRunner().invoke(app, ["plot", str(runs), "--compare", query, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    expected = _expected(
        runs,
        f"SELECT run_id, node, tokens, loss FROM steps WHERE (run_id, node) IN ({query}) ORDER BY run_id, node, step",
        NAMES,
    )
    assert sorted(expected) == ["lr-a: pretrain/phase1", "lr-b: pretrain/phase1", "other: pretrain/phase1"]
    assert _lines(drawn["compare-loss.png"]) == expected


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ("nope-*", "chooses no training node with telemetry"),
        ("SELECT node FROM nodes", "it must return run_id"),
        ("SELECT run_id FROM runs; DELETE FROM runs", "one statement at a time"),
    ],
)
def test_compare_that_chooses_nothing_or_no_run_id_is_an_error_naming_the_runs(
    runs: Path, tmp_path: Path, compare: str, message: str
) -> None:
    result = CliRunner().invoke(app, ["plot", str(runs), "--compare", compare, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
