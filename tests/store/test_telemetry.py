"""The telemetry writer: whole Parquet parts, the documented schemas, and concurrent node attempts."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trinity.run.layout import NodeDir, RunDir
from trinity.store.catalog import open_catalog
from trinity.store.sql import query
from trinity.store.telemetry import ADDED_COLUMNS, PART_RE, SCHEMAS, TelemetryWriter, moe_layer_stats
from trinity.store.verify import check_part


def _read(folder: Path, table: str) -> list[dict[str, Any]]:
    parts = sorted(p for p in folder.iterdir() if (m := PART_RE.match(p.name)) and m["table"] == table)
    rows: list[dict[str, Any]] = []
    for p in parts:
        t = pq.read_table(p)
        assert t.schema.equals(SCHEMAS[table]), f"{p.name}: {t.schema} != {SCHEMAS[table]}"
        rows += t.to_pylist()
    return rows


def test_rows_round_trip_with_schema_and_nulls(tmp_path: Path) -> None:
    node = NodeDir(tmp_path / "nodes" / "pretrain" / "phase1")
    w = TelemetryWriter(node, "pretrain/phase1", 2, "r1", tensorboard=False)
    w.log_step(1, tokens=4096, loss=3.5, ce_loss=3.4, lr_muon=0.02, batch_het=0.25, phase="phase1", time_s=0.0)
    w.log_step(2, tokens=8192, loss=3.0)
    counts = np.array([[5, 0, 3, 0], [2, 2, 2, 2]])
    w.log_moe_layers(2, **moe_layer_stats(counts, np.array([[0.1, -0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])))
    w.log_moe_layers(3, max_vio_L=[0.5, 0.0], dead_experts_L=[1, 0])  # no biases: null
    w.log_expert_load(2, counts)
    w.log_eval(2, "heldout_loss", 2.9, length=256, n=10, metric="loss", extra={"source": "docs"})
    w.log_event(2, "checkpoint", "committed", path="x")
    assert not list(node.telemetry(2).glob("*.parquet")), "nothing is written before a flush"
    written = w.flush()
    assert sorted(p.name.split("-")[0] for p in written) == ["evals", "events", "expert_load", "moe_layers", "steps"]
    w.close()

    folder = node.telemetry(2)
    assert folder == tmp_path / "nodes/pretrain/phase1/telemetry/attempt-0002"
    assert not [p for p in folder.iterdir() if not PART_RE.match(p.name)], "no temporary files left behind"
    steps = _read(folder, "steps")
    assert [(r["step"], r["tokens"], r["loss"], r["attempt"], r["node"]) for r in steps] == [
        (1, 4096, 3.5, 2, "pretrain/phase1"),
        (2, 8192, 3.0, 2, "pretrain/phase1"),
    ]
    assert steps[0]["time"].timestamp() == 0.0 and steps[0]["time"].tzinfo is not None
    assert steps[1]["ce_loss"] is None and steps[1]["phase"] is None

    moe = _read(folder, "moe_layers")
    assert [(r["step"], r["layer"], r["dead_experts"]) for r in moe] == [(2, 0, 2), (2, 1, 0), (3, 0, 1), (3, 1, 0)]
    assert moe[0]["max_vio"] == pytest.approx((5 - 2) / 2)  # (max - mean) / mean with mean = 8 / 4
    assert moe[1]["max_vio"] == 0.0
    assert moe[0]["bias_max"] == pytest.approx(0.1) and moe[0]["bias_std"] == pytest.approx(np.std([0.1, -0.1, 0, 0]))
    assert moe[2]["bias_mean"] is None

    load = _read(folder, "expert_load")
    assert len(load) == 8
    assert [(r["layer"], r["expert"], r["tokens"]) for r in load[:4]] == [(0, 0, 5), (0, 1, 0), (0, 2, 3), (0, 3, 0)]
    assert load[0]["fraction"] == pytest.approx(5 / 8)
    assert sum(r["fraction"] for r in load[4:]) == pytest.approx(1.0)

    (ev,) = _read(folder, "evals")
    assert (ev["task"], ev["metric"], ev["length"], ev["score"], ev["n"], ev["extra"]) == (
        "heldout_loss",
        "loss",
        256,
        2.9,
        10,
        '{"source": "docs"}',
    )
    (event,) = _read(folder, "events")
    assert (event["kind"], event["data"]) == ("checkpoint", '{"path": "x"}')


def test_max_vio_matches_the_optimizer_and_takes_torch_tensors() -> None:
    import torch  # imported here: the spawned writer processes below import this module without torch

    from trinity.optim.balancing import max_vio

    counts_LE = torch.tensor([[10, 0, 5, 1], [0, 0, 0, 0], [3, 3, 3, 3]])
    stats = moe_layer_stats(counts_LE)
    np.testing.assert_allclose(stats["max_vio_L"], max_vio(counts_LE).numpy(), rtol=1e-6)
    assert stats["dead_experts_L"].tolist() == [1, 4, 0]


def test_log_moe_records_the_max_vio_training_computed(tmp_path: Path) -> None:
    """The training step's MaxVio is written as given, not recomputed from the counts."""
    import torch

    from trinity.optim.balancing import max_vio

    counts_LE = torch.tensor([[10, 0, 5, 1], [3, 3, 3, 3]])
    vio_L = max_vio(counts_LE)
    node = NodeDir(tmp_path / "n")
    with TelemetryWriter(node, "n", 1, "r", tensorboard=False) as w:
        w.log_moe(1, counts_LE, max_vio_L=vio_L)
        w.log_moe(2, counts_LE, max_vio_L=torch.tensor([7.0, 0.25]))  # whatever training says
    rows = _read(node.telemetry(1), "moe_layers")
    assert [r["max_vio"] for r in rows] == [*vio_L.double().tolist(), 7.0, 0.25]
    assert [r["dead_experts"] for r in rows] == [1, 0, 1, 0]


def test_flush_cadence_and_part_numbering_continue(tmp_path: Path) -> None:
    node = NodeDir(tmp_path / "n")
    with TelemetryWriter(node, "n", 1, "r", flush_rows=3, tensorboard=False) as w:
        for s in range(1, 8):
            w.log_step(s, loss=1.0)
        # two automatic flushes of 3 rows; the 7th row waits for close()
        assert [len(pq.read_table(p)) for p in sorted(node.telemetry(1).glob("steps-*.parquet"))] == [3, 3]
    # a writer re-created within the same attempt appends new parts, never overwrites
    with TelemetryWriter(node, "n", 1, "r", tensorboard=False) as w:
        w.log_step(8, loss=1.0)
    names = sorted(p.name for p in node.telemetry(1).glob("steps-*.parquet"))
    assert names == [f"steps-{i:06d}.parquet" for i in range(4)]
    assert [r["step"] for r in _read(node.telemetry(1), "steps")] == list(range(1, 9))


def test_flush_seconds_writes_without_waiting_for_rows(tmp_path: Path) -> None:
    node = NodeDir(tmp_path / "n")
    w = TelemetryWriter(node, "n", 1, "r", flush_rows=10_000, flush_seconds=0.0, tensorboard=False)
    w.log_step(1, loss=1.0)
    assert len(list(node.telemetry(1).glob("steps-*.parquet"))) == 1
    w.close()


def test_expert_load_cadence(tmp_path: Path) -> None:
    node = NodeDir(tmp_path / "n")
    with TelemetryWriter(node, "n", 1, "r", expert_load_every=5, tensorboard=False) as w:
        for s in range(1, 11):
            w.log_moe(s, np.ones((2, 4), dtype=np.int64))
    assert sorted({r["step"] for r in _read(node.telemetry(1), "expert_load")}) == [5, 10]
    assert len(_read(node.telemetry(1), "moe_layers")) == 20


def _train(root: str, node_id: str, steps: int) -> None:
    """A node attempt in its own process, flushing a part every few steps like a training loop."""
    node = RunDir(Path(root)).node(node_id)
    with TelemetryWriter(node, node_id, 1, "run-c", flush_rows=10, tensorboard=False) as w:
        for s in range(1, steps + 1):
            w.log_step(s, tokens=s * 100, loss=1.0 / s)
            w.log_moe(s, np.full((2, 4), s))
            time.sleep(0.002)


def test_concurrent_nodes_write_while_a_reader_queries(tmp_path: Path, make_run: Callable[..., RunDir]) -> None:
    nodes = [f"pretrain/phase{i}" for i in range(1, 4)]
    run = make_run(tmp_path / "run", "run-c", [(n, "pretrain", {}) for n in nodes])
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_train, args=(str(run.root), n, 120)) for n in nodes]
    for p in procs:
        p.start()
    seen = []
    while any(p.is_alive() for p in procs):
        con = open_catalog(run.root)  # reads every part committed so far, never a half-written one
        seen.append(con.execute("SELECT count(*) FROM steps").fetchone())
        con.close()
        time.sleep(0.05)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    con = open_catalog(run.root)
    rows = con.execute("SELECT node, count(*), count(DISTINCT step), max(step) FROM steps GROUP BY node ORDER BY node")
    assert rows.fetchall() == [(n, 120, 120, 120) for n in nodes]
    assert con.execute("SELECT count(*) FROM moe_layers").fetchone() == (3 * 120 * 2,)
    assert len(seen) >= 1 and seen == sorted(seen), "a reader sees rows arrive, never vanish"


def test_steps_must_increase_within_an_attempt(tmp_path: Path) -> None:
    w = TelemetryWriter(NodeDir(tmp_path / "n"), "n", 1, "r", tensorboard=False)
    w.log_step(5, loss=1.0)
    with pytest.raises(ValueError, match="step 5 logged after step 5"):
        w.log_step(5, loss=1.0)
    w.log_expert_load(5, np.ones((1, 2)))
    with pytest.raises(ValueError, match="expert_load: step 4"):
        w.log_expert_load(4, np.ones((1, 2)))
    w.flush()
    with pytest.raises(ValueError, match="after step 5"):  # a flush does not forget the last step
        w.log_step(3, loss=1.0)
    w.close()


def _old_steps_part(node: NodeDir, node_id: str, run_id: str, steps: range) -> Path:
    """A `steps` part as writers before ADDED_COLUMNS wrote it: the same schema without those columns."""
    added = set(ADDED_COLUMNS["steps"])
    old = pa.schema([f for f in SCHEMAS["steps"] if f.name not in added])
    rows = [{"run_id": run_id, "node": node_id, "attempt": 1, "step": s, "loss": 1.0 / s} for s in steps]
    folder = node.telemetry(1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "steps-000000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=old), path, write_page_checksum=True)
    return path


def test_peak_memory_and_mfu_columns_beside_parts_written_before_them(
    tmp_path: Path, make_run: Callable[..., RunDir]
) -> None:
    """New parts carry mfu and the step's peak memory; parts older than those columns still read (as
    NULL there, in `trinity sql`'s views) and are not damaged for `trinity verify`."""
    old_id, new_id = "pretrain/phase1", "pretrain/phase2"
    run = make_run(tmp_path / "run", "r", [(old_id, "pretrain", {}), (new_id, "pretrain", {})])
    old_part = _old_steps_part(run.node(old_id), old_id, "r", range(1, 4))
    assert check_part(old_part, "steps") is None

    # Only old parts: the views still have every column.
    cols, rows = query(run.root, "SELECT step, mfu, peak_mem_allocated_bytes, peak_mem_reserved_bytes FROM steps")
    assert cols == ["step", "mfu", "peak_mem_allocated_bytes", "peak_mem_reserved_bytes"]
    assert sorted(rows) == [(1, None, None, None), (2, None, None, None), (3, None, None, None)]

    with TelemetryWriter(run.node(new_id), new_id, 1, "r") as w:
        w.log_step(1, loss=2.0, mfu=0.375, peak_mem_allocated_bytes=3 << 30, peak_mem_reserved_bytes=(3 << 30) + 5)
        w.log_step(2, loss=1.5, mfu=0.25, peak_mem_allocated_bytes=7 << 20)  # CPU: no reserved figure
    (new_part,) = [p for p in w.folder.iterdir() if PART_RE.match(p.name)]
    assert check_part(new_part, "steps") is None
    sql = "SELECT node, step, mfu, peak_mem_allocated_bytes, peak_mem_reserved_bytes FROM steps ORDER BY node, step"
    for view in ("steps", "steps_history"):
        _, rows = query(run.root, sql.replace("FROM steps", f"FROM {view}"))
        assert rows == [
            (old_id, 1, None, None, None),
            (old_id, 2, None, None, None),
            (old_id, 3, None, None, None),
            (new_id, 1, 0.375, 3 << 30, (3 << 30) + 5),
            (new_id, 2, 0.25, 7 << 20, None),
        ]
    tb = EventAccumulator(str(run.node(new_id).tensorboard(1)))
    tb.Reload()
    assert [e.value for e in tb.Scalars("mfu")] == [0.375, 0.25]
    assert [e.value for e in tb.Scalars("memory/peak_allocated_bytes")] == [3 << 30, 7 << 20]
    assert [e.step for e in tb.Scalars("memory/peak_reserved_bytes")] == [1]  # null: not written
