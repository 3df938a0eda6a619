"""Two writers of one attempt (the node and an executor's watchdog) number their parts apart and are both read."""

from __future__ import annotations

import pytest

from tests.store.conftest import P1
from trinity.run.layout import RunDir
from trinity.store.catalog import open_catalog
from trinity.store.telemetry import PART_RE, TelemetryWriter
from trinity.store.verify import verify_run


def test_a_named_writer_adds_events_without_touching_the_nodes_parts(resumed_run: RunDir) -> None:
    node = resumed_run.node(P1)
    folder = node.telemetry(2)
    before = sorted(p.name for p in folder.glob("*.parquet"))
    with TelemetryWriter(node, P1, 2, "r1", writer="watchdog", tensorboard=False) as w:
        w.log_event(12, "stall", "no step for 90 s since step 12", last_step=12)
    with TelemetryWriter(node, P1, 2, "r1", writer="watchdog", tensorboard=False) as w:  # a second stall
        w.log_event(12, "stall", "again", last_step=12)
    after = sorted(p.name for p in folder.glob("*.parquet"))
    added = sorted(set(after) - set(before))
    assert added == ["events-watchdog-000000.parquet", "events-watchdog-000001.parquet"]
    assert all(m is not None and m["writer"] == "watchdog" for m in map(PART_RE.match, added))
    # The node's own writer continues its numbering as if the watchdog's parts were not there.
    own = max(int(m["seq"]) for n in before if (m := PART_RE.match(n)))
    with TelemetryWriter(node, P1, 2, "r1", tensorboard=False) as w:
        w.log_event(13, "note")
    assert (folder / f"events-{own + 1:06d}.parquet").is_file()
    con = open_catalog(resumed_run.root)
    rows = con.execute("SELECT attempt, step, kind FROM events WHERE kind = 'stall' ORDER BY message").fetchall()
    assert rows == [(2, 12, "stall"), (2, 12, "stall")]
    assert verify_run(resumed_run.root).ok  # no gap reported across the two numberings


def test_a_writer_name_is_lowercase_letters(resumed_run: RunDir) -> None:
    with pytest.raises(ValueError, match="lowercase letters"):
        TelemetryWriter(resumed_run.node(P1), P1, 2, "r1", writer="../x", tensorboard=False)
