"""`trinity plan`'s data streams: each phase continues where the previous stopped, and wraps when a pass ends."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli_runs import trinity
from tests.conftest import compose
from trinity.data.stream_estimate import BYTES_PER_TOKEN, stream_estimates
from trinity.spec.loading import load_experiment


def test_passes_follow_the_cumulative_tokens_of_earlier_phases(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "x" * 90}) for _ in range(40)]  # 40 lines of 101 bytes with the newline
    (tmp_path / "web.jsonl").write_text("\n".join(lines) + "\n")
    size = (tmp_path / "web.jsonl").stat().st_size
    pass_tokens = int(size / BYTES_PER_TOKEN)  # 1010
    phases = [
        {"name": "a", "tokens": 600, "seq_len": 64, "mix": {"web": 1.0, "math": 1.0}},  # 300 of web
        {"name": "b", "tokens": 1000, "seq_len": 64, "mix": {"web": 1.0}},  # web 300..1299: wraps into pass 2
        {"name": "c", "tokens": 1500, "seq_len": 64, "mix": {"web": 1.0}},  # 1300..2799: passes 2-3
    ]
    sources = {"web": {"kind": "jsonl", "paths": ["web.jsonl"]}, "math": {"kind": "demo", "corpus": "math"}}
    graph = compose(tmp_path / "g.yaml", "micro.yaml", data={"sources": sources, "phases": phases})
    loaded = load_experiment(graph)
    got = stream_estimates(loaded.spec, loaded.base_dir)
    web = {node: rows["web"] for node, rows in got.items() if "web" in rows}
    assert [r["tokens_before"] for r in web.values()] == [0, 300, 1300]
    assert all(r["pass_tokens"] == pass_tokens for r in web.values())
    assert [(r["first_pass"], r["last_pass"]) for r in web.values()] == [(1, 1), (1, 2), (2, 3)]
    assert got["prepare/a"]["math"]["note"] == "endless"
    # The plan shows them; a source that cannot be listed is unknown, and the plan still succeeds.
    out = json.loads(trinity("plan", str(graph), "--json").stdout)
    assert out["data_streams"]["prepare/b"]["web"]["last_pass"] == 2
    missing = compose(
        tmp_path / "m.yaml",
        "micro.yaml",
        data={"sources": {**sources, "web": {"kind": "jsonl", "paths": ["nope/*.jsonl"]}}, "phases": phases},
    )
    shown = trinity("plan", str(missing))
    assert shown.returncode == 0, shown.stderr
    assert "nope/*.jsonl" in shown.stdout and "(wraps)" not in shown.stdout
