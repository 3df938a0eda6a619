"""A month of one node's telemetry, queried before and after compaction (prints JSON).

Writes the telemetry one training node writes in `--days` days at `--step-s` seconds a step, through
TelemetryWriter as the trainer calls it: every step a `steps` row and the MoE-layer stats of `--layers`
layers, every 10 steps the load of every (layer, expert) of `--experts` experts, a checkpoint event
every 1,000 steps. The writer flushes a part per table every 60 s of training (its default
flush_seconds; the default 500 rows come later at 4 s a step) and before every checkpoint; the
benchmark runs faster than real time, so it calls flush() every 60 / step_s steps itself.

Then it times, in this process, opening the catalog (`open_catalog`) and three typical queries:
the loss curve downsampled to 1,000-step buckets, each MoE layer's MaxVio over time (same buckets)
and one expert's load at every step it was logged; it compacts the attempt (trinity.store.compaction)
and times the same again. The answers must be equal before and after.

    python bench/telemetry_query.py [--days 30] [--step-s 4] [--layers 24] [--experts 64] [--flush-steps N]
                                    [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trinity.run.layout import RunDir, atomic_write_json
from trinity.store.catalog import open_catalog
from trinity.store.compaction import compact_run
from trinity.store.telemetry import TelemetryWriter

NODE = "pretrain/phase1"
QUERIES = {
    "loss_curve": "SELECT step // 1000 * 1000 AS bucket, avg(loss) AS loss FROM steps GROUP BY 1 ORDER BY 1",
    "max_vio_per_layer": (
        "SELECT layer, step // 1000 * 1000 AS bucket, max(max_vio) AS max_vio FROM moe_layers "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    ),
    "one_expert_load": "SELECT step, tokens, fraction FROM expert_load WHERE layer = 7 AND expert = 13 ORDER BY step",
}


def generate(
    root: Path, steps: int, step_s: float, layers: int, experts: int, flush_steps: int | None = None
) -> tuple[RunDir, float]:
    """The run directory (one node, one finished attempt) and the seconds writing it took; a part per table
    every `flush_steps` steps (None: every 60 s of training, as the writer does)."""
    run = RunDir(root)
    atomic_write_json(run.run_json, {"run_id": "month", "name": "month"})
    atomic_write_json(
        run.graph_json,
        {
            "nodes": [
                {
                    "id": NODE,
                    "kind": "pretrain",
                    "identity": "x",
                    "deps": [],
                    "target": "",
                    "branch": "",
                    "flat_spec": {},
                }
            ]
        },
    )
    node = run.node(NODE)
    rng = np.random.default_rng(0)
    pool = [rng.poisson(1000, size=(layers, experts)) for _ in range(16)]  # routed tokens per step
    bias = rng.normal(size=(layers, experts)) * 1e-3
    every = flush_steps or max(1, round(60.0 / step_s))  # the writer's flush_seconds = 60 in training time
    t0, start = time.perf_counter(), time.time() - steps * step_s
    with TelemetryWriter(node, NODE, 1, "month", tensorboard=False) as w:
        for step in range(1, steps + 1):
            w.log_step(
                step,
                tokens=step * 4_194_304,
                loss=2.0 + 8.0 / step**0.3,
                ce_loss=2.0 + 8.0 / step**0.3,
                lr_muon=0.02,
                lr_adamw=0.003,
                grad_norm=1.0,
                tokens_per_s=1e6,
                step_time_s=step_s,
                phase="phase1",
                time_s=start + step * step_s,
            )
            w.log_moe(step, pool[step % 16], bias)
            if step % 1000 == 0:
                w.log_event(step, "checkpoint", "committed", path=f"step-{step:08d}")
                w.flush()
            elif step % every == 0:
                w.flush()
    atomic_write_json(node.attempt_record(1), {"attempt": 1, "executor": "local", "identity": "x", "end": time.time()})
    return run, time.perf_counter() - t0


def timed(run: RunDir) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds of open_catalog and of each query (best of 2), and each query's answer."""
    seconds: dict[str, float] = {}
    answers: dict[str, Any] = {}
    for _ in range(2):
        t = time.perf_counter()
        con = open_catalog(run.root)
        seconds["open_catalog"] = min(seconds.get("open_catalog", 1e9), time.perf_counter() - t)
        for name, sql in QUERIES.items():
            t = time.perf_counter()
            answers[name] = con.execute(sql).fetchall()
            seconds[name] = min(seconds.get(name, 1e9), time.perf_counter() - t)
        con.close()
    seconds["total"] = seconds["open_catalog"] + sum(seconds[n] for n in QUERIES)
    return seconds, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--step-s", type=float, default=4.0)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--flush-steps",
        type=int,
        default=None,
        help="a part per table every this many steps (default: every 60 s of training, as the trainer writes); "
        "larger values write a month in minutes instead of half an hour, with fewer parts before compaction",
    )
    args = parser.parse_args()
    steps = int(args.days * 86400 / args.step_s)
    with tempfile.TemporaryDirectory(prefix="trinity-bench-") as tmp:
        run, write_s = generate(Path(tmp) / "run", steps, args.step_s, args.layers, args.experts, args.flush_steps)
        files = list((run.root / "nodes").rglob("*.parquet"))
        before_parts, before_bytes = len(files), sum(p.stat().st_size for p in files)
        before, answers_before = timed(run)
        t = time.perf_counter()
        report = compact_run(run.root)
        compact_s = time.perf_counter() - t
        after, answers_after = timed(run)
        for name in QUERIES:  # equal up to the order of float sums in DuckDB's parallel aggregation
            a, b = answers_before[name], answers_after[name]
            same = len(a) == len(b) and all(np.allclose(x, y, rtol=1e-9, atol=0) for x, y in zip(a, b, strict=True))
            assert same, f"compaction changed the answer of {name}"
    result = {
        "days": args.days,
        "step_s": args.step_s,
        "steps": steps,
        "moe_layers": args.layers,
        "experts": args.experts,
        "flush_steps": args.flush_steps,
        "rows": report.rows,
        "write_s": write_s,
        "parts": {"before": before_parts, "after": report.parts_after},
        "bytes": {"before": before_bytes, "after": report.bytes_after},
        "compact_s": compact_s,
        "seconds_before": before,
        "seconds_after": after,
        "speedup_total": before["total"] / after["total"],
        "target_total_s": 1.0,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
