"""TensorBoard events hold the same scalars as the telemetry tables (read back with TensorBoard itself)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trinity.run.layout import RunDir
from trinity.store.catalog import open_catalog


def test_event_files_match_the_parquet_rows(
    tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None]
) -> None:
    run = make_run(tmp_path / "r", "r", [("pretrain/phase1", "pretrain", {})])
    write_attempt(run, "r", "pretrain/phase1", 1, range(1, 9), tensorboard=True)
    folder = run.node("pretrain/phase1").tensorboard(1)
    assert folder == run.root / "nodes/pretrain/phase1/tensorboard/attempt-0001"
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "ce_loss", "lr/muon", "lr/adamw", "grad_norm", "batch_het", "tokens"} <= tags
    assert {"max_vio/layer_00", "max_vio/layer_02", "dead_experts/layer_00"} <= tags
    assert "aux_loss" not in tags  # never logged (null in the table): no TensorBoard series either

    con = open_catalog(run.root)
    steps = con.execute("SELECT step, loss, tokens FROM steps ORDER BY step").fetchall()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, pytest.approx(v, rel=1e-6)) for s, v, _ in steps]
    assert [e.value for e in acc.Scalars("tokens")] == [t for _, _, t in steps]
    vio = con.execute("SELECT step, max_vio FROM moe_layers WHERE layer = 2 ORDER BY step").fetchall()
    assert [(e.step, e.value) for e in acc.Scalars("max_vio/layer_02")] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in vio
    ]
    dead = con.execute("SELECT step, dead_experts FROM moe_layers WHERE layer = 0 ORDER BY step").fetchall()
    assert [(e.step, e.value) for e in acc.Scalars("dead_experts/layer_00")] == dead


def test_evals_get_a_tag_per_task_metric_and_length(tmp_path: Path) -> None:
    from trinity.run.layout import NodeDir
    from trinity.store.telemetry import TelemetryWriter

    node = NodeDir(tmp_path / "eval")
    with TelemetryWriter(node, "eval/heldout", 1, "r") as w:
        w.log_eval(100, "heldout_loss", 2.5, length=256, metric="loss")
        w.log_eval(100, "mmlu", 0.31)
    acc = EventAccumulator(str(node.tensorboard(1)))
    acc.Reload()
    assert [e.value for e in acc.Scalars("eval/heldout_loss/loss/256")] == [2.5]
    assert [e.value for e in acc.Scalars("eval/mmlu/score")] == [pytest.approx(0.31)]
