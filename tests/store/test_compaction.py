"""Compaction of finished attempts' telemetry parts (trinity.store.compaction, `trinity compact`): every row
kept, through every view, whatever point a compaction stops at; live attempts left alone; verify and the
writer's part numbering understand merged parts."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cli_runs import trinity
from tests.store.conftest import P1
from trinity.errors import RunError
from trinity.run.layout import RunDir, atomic_write_json
from trinity.run.status import Heartbeat
from trinity.store.catalog import open_catalog
from trinity.store.compaction import compact_node_attempt, compact_run, current_parts
from trinity.store.telemetry import ADDED_COLUMNS, SCHEMAS, TABLES, TelemetryWriter, parse_part
from trinity.store.verify import verify_run

P2 = "pretrain/phase2"

Fingerprint = dict[str, tuple[int, int]]


def fingerprint(run: RunDir) -> Fingerprint:
    """(rows, sum of row hashes) of every view, current and history, as `trinity sql` sees them."""
    con = open_catalog(run.root, strict=True)
    views = [v for t in TABLES for v in (t, f"{t}_history")]
    return {v: con.execute(f"SELECT count(*), coalesce(sum(hash(r)::HUGEINT), 0) FROM {v} r").fetchone() for v in views}  # type: ignore[misc]


def _record(run: RunDir, node: str, attempt: int, *, end: str | None = "2025-01-02T03:05:05+00:00") -> None:
    atomic_write_json(
        run.node(node).attempt_record(attempt),
        {"attempt": attempt, "executor": "local", "identity": "x", "start": "2025-01-02T03:04:05+00:00", "end": end},
    )


@pytest.fixture
def busy_run(resumed_run: RunDir) -> RunDir:
    """resumed_run (P1: attempt 1 steps 1..10, attempt 2 resumed at 6, steps 7..12; parts of 4 steps) plus
    events from a re-created writer and a second writer ("watchdog") in attempt 2, and P2's attempt 1 whose
    first part predates ADDED_COLUMNS."""
    node = resumed_run.node(P1)
    with TelemetryWriter(node, P1, 2, "r1", tensorboard=False, flush_rows=1) as w:
        for i in range(3):
            w.log_event(12, "checkpoint", f"committed {i}", n=i)
    with TelemetryWriter(node, P1, 2, "r1", tensorboard=False, flush_rows=1, writer="watchdog") as w:
        w.log_event(12, "stall", "no step for 600 s", seconds=600)
        w.log_event(12, "stall", "no step for 900 s", seconds=900)
    folder = resumed_run.node(P2).telemetry(1)
    folder.mkdir(parents=True)
    old = pa.schema([f for f in SCHEMAS["steps"] if f.name not in ADDED_COLUMNS["steps"]])
    rows = [{"run_id": "r1", "node": P2, "attempt": 1, "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    pq.write_table(pa.Table.from_pylist(rows, schema=old), folder / "steps-000000.parquet", write_page_checksum=True)
    with TelemetryWriter(resumed_run.node(P2), P2, 1, "r1", tensorboard=False, flush_rows=2) as w:
        for s in (4, 5, 6):
            w.log_step(s, loss=1.0 / s, mfu=0.5)
    _record(resumed_run, P2, 1)
    return resumed_run


def _groups(folder: Path) -> list[tuple[str, str | None, bool]]:
    """(table, writer, merged) of every part in use of an attempt folder, sorted."""
    current, _ = current_parts(folder)
    return sorted(((n.table, n.writer, n.merged) for n in current.values()), key=str)


def test_compact_keeps_every_row_and_verifies(busy_run: RunDir) -> None:
    before = fingerprint(busy_run)
    files_before = len(list((busy_run.root / "nodes").rglob("*.parquet")))
    assert before["steps"][0] == 12 + 6 and before["steps_history"][0] == 10 + 6 + 6
    assert before["events_history"][0] == 5

    result = trinity("compact", str(busy_run.root))  # as a user types it
    assert result.returncode == 0, result.stdout + result.stderr
    *per_attempt, total = result.stdout.strip().splitlines()
    files_after = len(list((busy_run.root / "nodes").rglob("*.parquet")))
    assert len(per_attempt) == 3 and total.startswith(f"compacted 3 attempts: {files_before} -> {files_after} parts, ")
    rows = sum(pq.read_metadata(p).num_rows for p in (busy_run.root / "nodes").rglob("*.parquet"))
    assert f" {rows} rows, " in total

    assert fingerprint(busy_run) == before
    p1 = busy_run.node(P1)
    assert _groups(p1.telemetry(1)) == [("expert_load", None, True), ("moe_layers", None, True), ("steps", None, True)]
    assert _groups(p1.telemetry(2)) == [
        ("events", "watchdog", True),
        ("events", None, True),
        ("expert_load", None, True),
        ("moe_layers", None, True),
        ("steps", None, True),
    ]
    merged = busy_run.node(P2).telemetry(1) / "steps-000000-000002.parquet"
    assert pq.read_table(merged).column("mfu").to_pylist() == [None, None, None, 0.5, 0.5, 0.5]
    assert [p.name for p in merged.parent.iterdir()] == [merged.name]  # originals gone, no temporary left

    report = verify_run(busy_run.root)
    assert report.ok and not report.notes and report.parts == files_after, report
    assert compact_run(busy_run.root).attempts == []  # nothing left to do


def test_a_compaction_stopped_at_any_point_counts_every_row_once(
    busy_run: RunDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = fingerprint(busy_run)
    folder = busy_run.node(P1).telemetry(1)
    originals = sorted(p.name for p in folder.iterdir())

    # Stopped before the rename: the merged rows exist only under the temporary name.
    real_replace = os.replace

    def stop_at_rename(src: str | Path, dst: str | Path) -> None:
        shutil.copy(src, Path(src).with_name(Path(src).name + ".copy.tmp"))  # what a killed process leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stop_at_rename)
    with pytest.raises(KeyboardInterrupt):
        compact_node_attempt(busy_run.node(P1), 1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".copy.tmp")) == originals
    assert fingerprint(busy_run) == before and verify_run(busy_run.root).ok

    # Stopped after the rename, before the originals are deleted: both on disk, the merged part counted.
    real_unlink = Path.unlink

    def stop_at_delete(self: Path, missing_ok: bool = False) -> None:
        if parse_part(self.name) is not None:
            raise KeyboardInterrupt
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", stop_at_delete)
    with pytest.raises(KeyboardInterrupt):
        compact_node_attempt(busy_run.node(P1), 1)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    current, superseded = current_parts(folder)
    assert len(superseded) == len(originals) and len(current) == 3 and all(n.merged for n in current.values())
    assert fingerprint(busy_run) == before
    report = verify_run(busy_run.root, P1)
    assert report.ok and len(report.notes) == len(originals), report

    # The next compaction removes what both stops left behind; a fresh temporary file may be a live writer's.
    stale = next(folder.glob("*.copy.tmp"))
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = folder / ".steps-000009.parquet.abc.tmp"
    fresh.write_bytes(b"")
    compact_run(busy_run.root, P1)
    assert _groups(folder) == [("expert_load", None, True), ("moe_layers", None, True), ("steps", None, True)]
    assert sorted(folder.iterdir()) == sorted([*current_parts(folder)[0], fresh])
    assert fingerprint(busy_run) == before and verify_run(busy_run.root).ok


def test_live_and_unended_attempts_are_left_alone(busy_run: RunDir) -> None:
    node = busy_run.node(P1)
    attempt2 = sorted(p.name for p in node.telemetry(2).iterdir())
    with Heartbeat(node, 2, 60.0):  # attempt 2 holds a live lease: it may still append
        with pytest.raises(RunError, match="attempt 2 is running"):
            compact_node_attempt(node, 2)
        report = compact_run(busy_run.root)
    assert [a.folder for a in report.attempts] == [node.telemetry(1), busy_run.node(P2).telemetry(1)]
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{P1}: attempt 2 is running (heartbeat ")
    assert sorted(p.name for p in node.telemetry(2).iterdir()) == attempt2
    node.lease.unlink()  # the heartbeat stopped; its lease would count as live for 3 periods

    _record(busy_run, P1, 2, end=None)  # no end, no later attempt, no lease: it may not have started writing
    with pytest.raises(RunError, match="has not ended"):
        compact_node_attempt(node, 2)
    _record(busy_run, P1, 3, end=None)  # a later attempt started: attempt 2 is over even without an end
    assert compact_node_attempt(node, 2).parts_after == 5


def test_a_writer_continuing_a_compacted_attempt_uses_new_numbers(busy_run: RunDir) -> None:
    compact_run(busy_run.root)
    folder = busy_run.node(P1).telemetry(2)
    last = max(n.last for n in current_parts(folder)[0].values() if n.writer is None)
    with TelemetryWriter(busy_run.node(P1), P1, 2, "r1", tensorboard=False) as w:
        w.log_step(13, loss=0.5)
    (new,) = [p for p in folder.iterdir() if (n := parse_part(p.name)) and not n.merged]
    assert new.name == f"steps-{last + 1:06d}.parquet"
    con = open_catalog(busy_run.root)
    assert con.execute(f"SELECT count(*) FROM steps WHERE node = '{P1}'").fetchone() == (13,)
    assert verify_run(busy_run.root).ok
    compact_run(busy_run.root)  # merges the merged part with the new one
    assert [n.merged for n in current_parts(folder)[0].values() if n.table == "steps"] == [True]
    con = open_catalog(busy_run.root)  # a catalog opened before a compaction names files it deleted
    assert con.execute(f"SELECT count(*) FROM steps WHERE node = '{P1}'").fetchone() == (13,)


def test_verify_finds_a_lost_merged_part_and_damage_is_never_merged(
    busy_run: RunDir, make_run: Callable[..., RunDir]
) -> None:
    folder = busy_run.node(P1).telemetry(1)
    damaged = sorted(folder.glob("moe_layers-*.parquet"))[1]
    damaged.write_bytes(damaged.read_bytes()[:-50])
    report = compact_run(busy_run.root, P1)
    assert report.problems and str(damaged) in report.problems[0] and "moe_layers not compacted" in report.problems[0]
    assert damaged.exists() and len(list(folder.glob("moe_layers-*.parquet"))) == 3  # left as it was
    damaged.unlink()  # its number (4) lies inside the merged steps part's range (0-6): counted, not named
    problems = verify_run(busy_run.root, P1).problems
    assert list(problems) == [
        f"{folder}: 1 telemetry part is missing from the ranges of its merged parts "
        "(expert_load-000002-000008.parquet, steps-000000-000006.parquet): their rows are lost"
    ]
