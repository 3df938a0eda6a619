"""TensorBoard event files of one node attempt: the scalars of the telemetry tables, live-plottable.

DuckDB is the record (queryable, joined with the spec); TensorBoard is for watching a run while it
trains. The same values go to both: `TelemetryWriter(..., tensorboard=True)` mirrors every step,
MoE-layer and eval row here. Events land in NodeDir.tensorboard(attempt), so
`tensorboard --logdir RUN/nodes` shows every node and attempt as its own run.

Tags (global step = optimizer step):
    loss, ce_loss, aux_loss, z_loss, grad_norm, tokens_per_s, step_time_s, batch_het, mfu, tokens
    lr/muon, lr/adamw
    memory/peak_allocated_bytes, memory/peak_reserved_bytes    (the step's peak device memory)
    max_vio/layer_NN, dead_experts/layer_NN      (NN = MoE layer index, from 00)
    eval/<task>/<metric>[/<length>]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch.utils.tensorboard import SummaryWriter

_TAGS = {
    "lr_muon": "lr/muon",
    "lr_adamw": "lr/adamw",
    "peak_mem_allocated_bytes": "memory/peak_allocated_bytes",
    "peak_mem_reserved_bytes": "memory/peak_reserved_bytes",
}


def step_tag(name: str) -> str:
    """The TensorBoard tag of a `steps` column."""
    return _TAGS.get(name, name)


def layer_tag(stat: str, layer: int) -> str:
    return f"{stat}/layer_{layer:02d}"


class TensorBoardWriter:
    """Scalars of one node attempt as TensorBoard events (written by a background thread)."""

    def __init__(self, folder: Path, flush_secs: int = 30) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._w = SummaryWriter(log_dir=str(folder), flush_secs=flush_secs)

    def log_step(self, step: int, scalars: Mapping[str, float | None], tokens: int | None = None) -> None:
        """The non-null `steps` scalars of one step."""
        for name, value in scalars.items():
            if value is not None:
                self._w.add_scalar(step_tag(name), float(value), step)
        if tokens is not None:
            self._w.add_scalar("tokens", float(tokens), step)

    def log_moe(self, step: int, max_vio_L: npt.NDArray[Any], dead_experts_L: npt.NDArray[Any]) -> None:
        for layer, (vio, dead) in enumerate(zip(np.asarray(max_vio_L), np.asarray(dead_experts_L), strict=True)):
            self._w.add_scalar(layer_tag("max_vio", layer), float(vio), step)
            self._w.add_scalar(layer_tag("dead_experts", layer), float(dead), step)

    def log_eval(self, step: int, task: str, metric: str, length: int | None, score: float) -> None:
        tag = f"eval/{task}/{metric}" + ("" if length is None else f"/{length}")
        self._w.add_scalar(tag, score, step)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()
