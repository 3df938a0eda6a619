"""Synthetic run directories of the micro graph's spec, written the way the executor writes them
(docs/telemetry.md): node files and telemetry of made-up attempts, without training anything."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.distributed as dist
from matplotlib.figure import Figure
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tests.conftest import TEST_GRAPHS
from trinity.graph.diff import flatten
from trinity.run.layout import RunDir, atomic_write_json
from trinity.spec.loading import load_experiment
from trinity.store.telemetry import TelemetryWriter

L, E = 3, 8  # MoE layers and experts of the micro model (tests/graphs/micro.yaml)
P1 = "pretrain/phase1"

FLAT_SPEC: dict[str, Any] = {
    path: value for path, (value, _) in flatten(load_experiment(TEST_GRAPHS / "micro.yaml").spec).items()
}
"""The micro graph's spec flattened as graph.json holds it (`execute.run.write_run`)."""


def _make_run(
    root: Path,
    run_id: str,
    nodes: Sequence[tuple[str, str, dict[str, Any]]],
) -> RunDir:
    """A run directory with run.json and graph.json; nodes are (id, kind, flat_spec overrides)."""
    run = RunDir(root)
    atomic_write_json(
        run.run_json,
        {"run_id": run_id, "name": run_id, "created": "2025-01-02T03:04:05+00:00", "trinity_version": "0.1.0"},
    )
    graph = {
        "nodes": [
            {
                "id": node_id,
                "kind": kind,
                "identity": f"{run_id}-{i:04d}",
                "deps": [nodes[i - 1][0]] if i else [],
                "target": "",
                "branch": "",
                "flat_spec": FLAT_SPEC | overrides,
            }
            for i, (node_id, kind, overrides) in enumerate(nodes)
        ]
    }
    atomic_write_json(run.graph_json, graph)
    for node_id, _, _ in nodes:
        atomic_write_json(run.node(node_id).status, {"state": "PENDING", "identity": "x", "updated": 0})
    return run


def _write_attempt(
    run: RunDir,
    run_id: str,
    node_id: str,
    attempt: int,
    steps: Sequence[int],
    *,
    resumed_from_step: int | None = None,
    state: str = "SUCCEEDED",
    loss_offset: float = 0.0,
    record: bool = True,
    phase: str = "phase1",
    tensorboard: bool = False,
) -> None:
    """One attempt's record and telemetry: loss = 10 / step + loss_offset + attempt / 1000."""
    node = run.node(node_id)
    if record:
        atomic_write_json(
            node.attempt_record(attempt),
            {
                "attempt": attempt,
                "executor": "local",
                "job_id": None,
                "array_index": None,
                "host": "h",
                "pid": 123,
                "start": "2025-01-02T03:04:05+00:00",
                "end": "2025-01-02T03:05:05+00:00",
                "state": state,
                "exit_code": 0,
                "signal": None,
                "resumed_from_step": resumed_from_step,
            },
        )
    rng = np.random.default_rng(attempt)
    with TelemetryWriter(
        node, node_id, attempt, run_id, flush_rows=4, tensorboard=tensorboard, expert_load_every=2
    ) as w:
        for s in steps:
            w.log_step(
                s,
                tokens=1024 * s,
                loss=10.0 / s + loss_offset + attempt / 1000,
                ce_loss=10.0 / s,
                lr_muon=0.02,
                lr_adamw=0.003,
                grad_norm=1.0,
                batch_het=0.1,
                phase=phase,
            )
            counts = rng.integers(0, 100, size=(L, E))
            counts[0, 0] = 0
            w.log_moe(s, counts, rng.normal(size=(L, E)))
    atomic_write_json(node.status, {"state": state, "identity": "x", "updated": "2025-01-02T03:05:05+00:00"})


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """The figures the command saves, by file name (caught, not rendered: rendering is what costs time)."""
    figures: dict[str, Figure] = {}

    def record(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        figures[Path(fname).name] = self

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


@pytest.fixture
def make_run() -> Callable[..., RunDir]:
    return _make_run


@pytest.fixture
def write_attempt() -> Callable[..., None]:
    return _write_attempt


@pytest.fixture
def resumed_run(tmp_path: Path) -> RunDir:
    """Attempt 1 logs steps 1..10 and dies; attempt 2 restores the checkpoint of step 6 and logs 7..12."""
    run = _make_run(tmp_path / "runs" / "r1", "r1", [(P1, "pretrain", {}), ("pretrain/phase2", "pretrain", {})])
    _write_attempt(run, "r1", P1, 1, range(1, 11), state="FAILED")
    _write_attempt(run, "r1", P1, 2, range(7, 13), resumed_from_step=6)
    return run


@pytest.fixture
def one_rank_mesh() -> Iterator[DeviceMesh]:
    """A gloo group of one, in this process (a job on one rank that still uses DTensors)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    finally:
        dist.destroy_process_group()
