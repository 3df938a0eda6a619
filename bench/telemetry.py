"""Telemetry cost and speed (prints JSON): overhead per training step, ingest rows/s, a 10M-row query.

1. overhead: the tiny model (specs/model/tiny.yaml) trains real steps (forward + backward + Muon/AdamW
   step + expert-bias update, batch 16 x 256 tokens), alternating steps with and without telemetry
   in one process. A logged step records everything a training step logs, at the heaviest cadence:
   the steps row, the MoE-layer stats (MaxVio, bias statistics, dead experts), the expert load of
   every (layer, expert) on EVERY step, and the TensorBoard mirror. Reported: the time of the logging
   calls (plus the amortised cost of flushing parts, measured on the same rows), as a fraction of the
   untimed step, and the step-time difference between the two arms.
2. ingest: rows/s of TelemetryWriter, all tables, Parquet parts flushed as in training.
3. query: 10M expert_load rows (16 MoE layers x 64 experts x 9,766 steps, two attempts with a resume)
   written through the writer, then queried through the catalog: the default view (each step once,
   superseded rows filtered) and the history view.

    python bench/telemetry.py [--steps 8] [--rows 10000000] [--out bench/telemetry.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trinity.model import TrinityModel
from trinity.optim.balancing import update_expert_biases
from trinity.optim.groups import build_optimizer
from trinity.run.layout import NodeDir, RunDir, atomic_write_json
from trinity.spec.model import ModelSpec
from trinity.spec.optim import OptimSpec
from trinity.spec.stability import SignBalancing
from trinity.store.catalog import open_catalog
from trinity.store.telemetry import TelemetryWriter

ROOT = Path(__file__).resolve().parents[1]


def overhead(steps: int, folder: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    spec = ModelSpec.model_validate(yaml.safe_load((ROOT / "specs/model/tiny.yaml").read_text()))
    model = TrinityModel(spec)
    optimizer = build_optimizer(model, OptimSpec())
    B, T = 16, 256
    ids = torch.randint(0, spec.vocab_size, (B, T + 1))
    writer = TelemetryWriter(NodeDir(folder / "node"), "pretrain/phase1", 1, "bench", expert_load_every=1)
    moes = model.moe_layers()
    balancing = SignBalancing()

    def train_step() -> tuple[float, torch.Tensor, float]:
        t0 = time.perf_counter()
        out = model(ids[:, :-1], labels_BT=ids[:, 1:])
        assert out.ce_loss is not None and out.z_loss_term is not None
        loss = out.ce_loss + 1e-4 * out.z_loss_term + 1e-4 * out.aux_loss_per_layer.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        optimizer.step()
        optimizer.zero_grad()
        update_expert_biases(model, out.expert_counts, balancing)
        return float(loss.detach()), out.expert_counts, time.perf_counter() - t0

    def log(step: int, loss: float, counts_LE: torch.Tensor, seconds: float) -> float:
        t0 = time.perf_counter()
        bias_LE = torch.stack([m.expert_bias for m in moes]).float()
        writer.log_step(
            step,
            tokens=step * B * T,
            loss=loss,
            ce_loss=loss,
            aux_loss=0.0,
            z_loss=0.0,
            lr_muon=0.02,
            lr_adamw=0.003,
            grad_norm=1.0,
            tokens_per_s=B * T / seconds,
            step_time_s=seconds,
            batch_het=0.0,
            phase="phase1",
        )
        writer.log_moe(step, counts_LE, bias_LE)  # stats + expert load (cadence 1: every step)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        train_step()
    plain, logged, log_s = [], [], []
    for i in range(steps):
        _, _, s = train_step()
        plain.append(s)
        t0 = time.perf_counter()
        loss, counts, s = train_step()
        log_s.append(log(i + 1, loss, counts, s))
        logged.append(time.perf_counter() - t0)
    # Flushing: time a flush of the rows `flush_rows` such steps leave, and amortise it per step.
    n = writer.flush_rows
    writer.flush()
    counts_np = counts.numpy()
    bias = np.zeros_like(counts_np, dtype=np.float32)
    for i in range(n):
        writer.log_step(10_000 + i, tokens=i, loss=1.0, lr_muon=0.1, phase="phase1")
        writer.log_moe(10_000 + i, counts_np, bias)
    t0 = time.perf_counter()
    writer.flush()
    flush_per_step = (time.perf_counter() - t0) / n
    writer.close()
    step_s = statistics.median(plain)
    per_step = statistics.median(log_s) + flush_per_step
    return {
        "config": "specs/model/tiny.yaml",
        "batch": [B, T],
        "steps_per_arm": steps,
        "moe_layers": len(moes),
        "experts": spec.moe.n_experts,
        "step_s_without": step_s,
        "step_s_with": statistics.median(logged),
        "log_calls_s": statistics.median(log_s),
        "flush_s_per_step": flush_per_step,
        "telemetry_s_per_step": per_step,
        "overhead_fraction": per_step / step_s,
        "overhead_fraction_step_diff": statistics.median(logged) / step_s - 1,
        "target_fraction": 0.02,
    }


def _run_dir(root: Path, run_id: str, node: str, attempts: list[dict[str, Any]]) -> RunDir:
    run = RunDir(root)
    atomic_write_json(run.run_json, {"run_id": run_id, "name": run_id})
    atomic_write_json(run.graph_json, {"nodes": [{"id": node, "kind": "pretrain", "flat_spec": {"x": 1}}]})
    for a in attempts:
        atomic_write_json(run.node(node).attempt_record(a["attempt"]), a)
    return run


def ingest(folder: Path, steps: int = 2000, L: int = 5, E: int = 8) -> dict[str, Any]:
    run = _run_dir(folder, "ingest", "pretrain/phase1", [{"attempt": 1}])
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, size=(steps, L, E))
    bias = rng.normal(size=(L, E))
    t0 = time.perf_counter()
    with TelemetryWriter(
        run.node("pretrain/phase1"), "pretrain/phase1", 1, "ingest", expert_load_every=1, tensorboard=False
    ) as w:
        for s in range(steps):
            w.log_step(
                s + 1,
                tokens=s * 4096,
                loss=1.0,
                ce_loss=1.0,
                lr_muon=0.02,
                lr_adamw=0.003,
                grad_norm=1.0,
                tokens_per_s=1e5,
                step_time_s=0.1,
                batch_het=0.01,
                phase="phase1",
            )
            w.log_moe(s + 1, counts[s], bias)
    seconds = time.perf_counter() - t0
    rows = steps * (1 + L + L * E)
    return {
        "steps": steps,
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "steps_per_s": steps / seconds,
        "tables": "steps + moe_layers + expert_load, every step",
    }


def big_query(folder: Path, rows: int, L: int = 16, E: int = 64) -> dict[str, Any]:
    steps = rows // (L * E)
    resume = int(steps * 0.9)
    crash = resume + steps // 20  # attempt 1 logged past the checkpoint it will be resumed from
    run = _run_dir(
        folder,
        "big",
        "pretrain/phase1",
        [{"attempt": 1, "state": "FAILED"}, {"attempt": 2, "resumed_from_step": resume}],
    )
    rng = np.random.default_rng(0)
    block = rng.integers(0, 500, size=(64, L, E))
    t0 = time.perf_counter()
    written = 0
    for attempt, span in ((1, range(1, crash + 1)), (2, range(resume + 1, steps + 1))):
        node = run.node("pretrain/phase1")
        with TelemetryWriter(node, "pretrain/phase1", attempt, "big", flush_rows=200, tensorboard=False) as w:
            for s in span:
                w.log_step(s, tokens=s * 4096, loss=1.0 / s)
                w.log_expert_load(s, block[s % 64])
                written += L * E
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    con = open_catalog(run.root)
    open_s = time.perf_counter() - t0
    queries = {
        "mean_load_current": "SELECT layer, expert, avg(fraction) FROM expert_load GROUP BY ALL",
        "mean_load_history": "SELECT layer, expert, avg(fraction) FROM expert_load_history GROUP BY ALL",
        "count_current": "SELECT count(*) FROM expert_load",
        "last_step_load": "SELECT layer, expert, fraction FROM expert_load WHERE step = (SELECT max(step) FROM steps)",
    }
    times: dict[str, float] = {}
    for name, sql in queries.items():
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            con.execute(sql).fetchall()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    (current,) = con.execute("SELECT count(*) FROM expert_load").fetchone()  # type: ignore[misc]
    (history,) = con.execute("SELECT count(*) FROM expert_load_history").fetchone()  # type: ignore[misc]
    assert current == steps * L * E and history == written
    return {
        "rows_history": history,
        "rows_current": current,
        "write_s": write_s,
        "write_rows_per_s": written / write_s,
        "open_catalog_s": open_s,
        "query_s": times,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per arm (with / without telemetry)")
    ap.add_argument("--rows", type=int, default=10_000_000, help="expert_load rows for the query benchmark")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "overhead": overhead(args.steps, Path(tmp) / "overhead"),
            "ingest": ingest(Path(tmp) / "ingest"),
            "query_10m": big_query(Path(tmp) / "big", args.rows),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
