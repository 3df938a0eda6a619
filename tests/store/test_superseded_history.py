"""A node folder superseded when its identity changed stays in `<table>_history` with the identity it had
(trinity/store/catalog.py), while `<table>` holds the current folder's rows only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from tests.store.conftest import P1
from trinity.execute.run import supersede
from trinity.graph.compile import Node
from trinity.run.layout import RunDir, atomic_write_json
from trinity.store.catalog import open_catalog


def _identity(run: RunDir, identity: str) -> None:
    atomic_write_json(run.node(P1).status, {"state": "SUCCEEDED", "identity": identity, "updated": 0})


def test_a_superseded_variant_stays_in_history_with_its_identity(
    tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None]
) -> None:
    run = make_run(tmp_path / "r1", "r1", [(P1, "pretrain", {})])
    write_attempt(run, "r1", P1, 1, range(1, 6))  # the old variant: 5 steps, loss 10/s + 0.001
    _identity(run, "old-identity")
    moved = supersede(run, cast(Node, SimpleNamespace(id=P1, identity="new-identity")))
    assert moved is not None and not run.node(P1).root.exists()
    write_attempt(run, "r1", P1, 1, range(1, 4), loss_offset=100.0)  # the new one: 3 steps, loss + 100
    _identity(run, "new-identity")

    con = open_catalog(run.root)
    history = con.sql(
        f"select identity, superseded_folder, step, loss from steps_history where node = '{P1}' "
        "order by superseded_folder nulls last, step"
    ).fetchall()
    old: list[tuple[Any, ...]] = [("old-identity", str(moved.resolve()), s, 10.0 / s + 0.001) for s in range(1, 6)]
    new: list[tuple[Any, ...]] = [("new-identity", None, s, 10.0 / s + 100.001) for s in range(1, 4)]
    assert [(i, f, s, round(v, 4)) for i, f, s, v in history] == [(i, f, s, round(v, 4)) for i, f, s, v in old + new]
    current = con.sql(f"select step, loss from steps where node = '{P1}' order by step").fetchall()
    assert [(s, round(v, 4)) for s, v in current] == [(s, round(v, 4)) for _, _, s, v in new]
    assert "identity" not in [c for c, *_ in con.sql("describe steps").fetchall()]  # current views keep their columns
    layers = con.sql(
        f"select superseded_folder is null, count(*) from moe_layers_history where node = '{P1}' group by 1 order by 1"
    ).fetchall()
    assert layers == [(False, 5 * 3), (True, 3 * 3)]  # 3 MoE layers a step (tests/store/conftest.py)
    assert con.sql(f"select count(*) from moe_layers where node = '{P1}'").fetchall() == [(3 * 3,)]
