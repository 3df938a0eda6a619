"""Training telemetry: each node attempt appends its own Parquet parts; DuckDB reads them all.

DuckDB allows one writing process per database file, and several nodes train at once, so no
process ever writes a shared database. A node attempt owns one folder,

    RUN/nodes/<node id>/telemetry/attempt-NNNN/<table>-<seq:06d>.parquet

and appends whole Parquet files to it: each part is written under a hidden temporary name in the
same folder and renamed into place, so a reader (or a crash) only ever sees complete parts. Every
page carries a CRC (Parquet page checksums), so `trinity verify` finds changed bits, not only
truncated files. Once the attempt has finished, `trinity.store.compaction` merges its parts into
one `<table>-<first:06d>-<last:06d>.parquet` per table, which stands for the parts it merged.
`trinity.store.catalog` exposes every part of every attempt as DuckDB views; the schemas below
are the contract it reads (docs/telemetry.md lists every column with its unit).

Logging a step only appends Python scalars to column lists (a few microseconds); rows become
Arrow columns and one Parquet part per table every `flush_rows` steps, every `flush_seconds`,
and on `flush()`. The training loop calls `flush()` before it commits a checkpoint, so telemetry
up to any committed checkpoint is on disk. Only one process per node attempt (rank 0) writes.

Array arguments may be numpy arrays, lists or CPU/GPU torch tensors (copied to host here, so the
store layer never imports torch).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from trinity.run.layout import NodeDir

TIMESTAMP = pa.timestamp("us", tz="UTC")

_KEY = [
    pa.field("run_id", pa.string()),
    pa.field("node", pa.string()),
    pa.field("attempt", pa.int32()),
    pa.field("step", pa.int64()),
]

STEP_SCALARS = (
    "loss",
    "ce_loss",
    "aux_loss",
    "z_loss",
    "lr_muon",
    "lr_adamw",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
    "batch_het",
    "mfu",
)
"""The float columns of `steps` (besides tokens, phase and time), in schema order."""

STEP_MEMORY = ("peak_mem_allocated_bytes", "peak_mem_reserved_bytes")
"""The integer columns of `steps` after the floats: the step's peak device memory, bytes
(trinity.distributed.device.PeakMemory: CUDA allocated / reserved; CPU peak RSS / null)."""

ADDED_COLUMNS: dict[str, tuple[str, ...]] = {"steps": ("mfu", *STEP_MEMORY)}
"""Columns newer than the first telemetry parts. Parts written before them lack them: they read as
NULL (the catalog's views always have every column of SCHEMAS) and are not damaged (`trinity verify`)."""

SCHEMAS: dict[str, pa.Schema] = {
    "steps": pa.schema(
        [
            *_KEY,
            pa.field("time", TIMESTAMP),
            pa.field("phase", pa.string()),
            pa.field("tokens", pa.int64()),
            *(pa.field(name, pa.float64()) for name in STEP_SCALARS),
            *(pa.field(name, pa.int64()) for name in STEP_MEMORY),
        ]
    ),
    "moe_layers": pa.schema(
        [
            *_KEY,
            pa.field("layer", pa.int32()),
            pa.field("max_vio", pa.float64()),
            pa.field("bias_mean", pa.float64()),
            pa.field("bias_std", pa.float64()),
            pa.field("bias_min", pa.float64()),
            pa.field("bias_max", pa.float64()),
            pa.field("dead_experts", pa.int32()),
        ]
    ),
    "expert_load": pa.schema(
        [
            *_KEY,
            pa.field("layer", pa.int32()),
            pa.field("expert", pa.int32()),
            pa.field("tokens", pa.int64()),
            pa.field("fraction", pa.float64()),
        ]
    ),
    "evals": pa.schema(
        [
            *_KEY,
            pa.field("time", TIMESTAMP),
            pa.field("task", pa.string()),
            pa.field("metric", pa.string()),
            pa.field("length", pa.int64()),
            pa.field("score", pa.float64()),
            pa.field("n", pa.int64()),
            pa.field("extra", pa.string()),
        ]
    ),
    "events": pa.schema(
        [
            *_KEY,
            pa.field("time", TIMESTAMP),
            pa.field("kind", pa.string()),
            pa.field("message", pa.string()),
            pa.field("data", pa.string()),
        ]
    ),
}
"""Arrow schema of every telemetry table; the Parquet parts hold exactly these columns."""

TABLES = tuple(SCHEMAS)
PART_RE = re.compile(r"^(?P<table>[a-z_]+)-(?:(?P<writer>[a-z]+)-)?(?P<seq>\d{6})(?:-(?P<last>\d{6}))?\.parquet$")
"""Committed part names, `<table>-<seq>.parquet` from the node's own writer and `<table>-<writer>-<seq>.parquet`
from another writer of the same attempt (e.g. "watchdog": the executor records a stall of a node that
cannot log it itself); each writer numbers its own parts. A merged part (trinity.store.compaction) is
`<table>[-<writer>]-<seq>-<last>.parquet`: it holds the rows of that writer's parts of `table` numbered
`seq` to `last`. Temporary parts start with '.' and never match."""
WRITER_RE = re.compile(r"^[a-z]+$")


@dataclass(frozen=True)
class PartName:
    """What a committed part's name says: its table, its writer (None: the node's own) and the part
    numbers it holds, first to last (equal for a part as the writer wrote it, a range for a merged one)."""

    table: str
    writer: str | None
    first: int
    last: int

    @property
    def merged(self) -> bool:
        return self.last != self.first

    def covers(self, other: PartName) -> bool:
        """True when this part holds `other`'s rows: same table and writer, its numbers within ours, not itself."""
        same = (self.table, self.writer) == (other.table, other.writer)
        inside = self.first <= other.first and other.last <= self.last
        return same and inside and (self.first, self.last) != (other.first, other.last)

    def filename(self) -> str:
        tag = "" if self.writer is None else f"{self.writer}-"
        rng = f"{self.first:06d}" + (f"-{self.last:06d}" if self.merged else "")
        return f"{self.table}-{tag}{rng}.parquet"


def parse_part(name: str) -> PartName | None:
    """The PartName of a committed part's file name; None for anything else (temporary files, other files)."""
    m = PART_RE.match(name)
    if m is None:
        return None
    first = int(m["seq"])
    last = first if m["last"] is None else int(m["last"])
    return PartName(m["table"], m["writer"], first, last) if last >= first else None


ArrayLike = npt.ArrayLike | Any  # numpy, sequences, or a torch tensor (anything with .detach())


def to_numpy(x: ArrayLike) -> npt.NDArray[Any]:
    """A host numpy array from numpy/list/torch input, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def moe_layer_stats(
    counts_LE: ArrayLike, bias_LE: ArrayLike | None = None, max_vio_L: ArrayLike | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Per-MoE-layer statistics of one optimizer step, as `log_moe_layers` takes them.

    counts_LE: tokens routed to each expert (summed over micro-batches and ranks), one row per MoE layer.
    bias_LE: the expert biases after this step's update (None: bias columns are null); std is the
        population standard deviation.
    max_vio_L: MaxVio = (max_i n_i - mean n) / mean n per layer (0 when no token was routed) as the
        training step computed it (`trinity.optim.balancing.update_expert_biases` returns it), taken
        as is; None: computed here from counts_LE, for writers that have no optimizer (tests, benchmarks).
    dead experts = experts that received no token this step.
    """
    n = to_numpy(counts_LE).astype(np.float64)
    if max_vio_L is not None:
        vio = to_numpy(max_vio_L).astype(np.float64).ravel()
    else:
        n_mean = n.mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            vio = np.where(n_mean > 0, (n.max(axis=1) - n_mean) / np.where(n_mean > 0, n_mean, 1.0), 0.0)
    stats = {"max_vio_L": vio, "dead_experts_L": (n == 0).sum(axis=1)}
    if bias_LE is not None:
        b = to_numpy(bias_LE).astype(np.float64)
        stats |= {"bias_mean_L": b.mean(1), "bias_std_L": b.std(1), "bias_min_L": b.min(1), "bias_max_L": b.max(1)}
    return stats


class TelemetryWriter:
    """Append-only telemetry of one node attempt (see the module docstring for the layout).

    expert_load_every: `log_moe` records the per-expert load (layers x experts rows) only at
    steps that are multiples of this, because it is the largest table by far.
    tensorboard: also write the step and MoE scalars as TensorBoard events under
    NodeDir.tensorboard(attempt).
    writer: None for the node's own writer; a name (lowercase letters) for another process that adds
    rows to the same attempt (see PART_RE): its parts are numbered apart, so neither overwrites the other.
    """

    def __init__(
        self,
        node_dir: NodeDir,
        node_id: str,
        attempt: int,
        run_id: str,
        *,
        flush_rows: int = 500,
        flush_seconds: float = 60.0,
        expert_load_every: int = 10,
        tensorboard: bool = True,
        writer: str | None = None,
    ) -> None:
        if attempt < 1:
            raise ValueError(f"attempt numbers start at 1, got {attempt}")
        if writer is not None and not WRITER_RE.match(writer):
            raise ValueError(f"a telemetry writer's name is lowercase letters, got {writer!r}")
        self.writer = writer
        self.folder = node_dir.telemetry(attempt)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.node_id, self.attempt, self.run_id = node_id, attempt, run_id
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.expert_load_every = expert_load_every
        # A writer re-created within the same attempt continues the part numbering, never overwrites.
        # A merged part (trinity.store.compaction) counts as every number it holds: none is used again.
        names = [n for p in self.folder.iterdir() if (n := parse_part(p.name)) is not None and n.writer == writer]
        self._seq = max((n.last for n in names), default=-1) + 1
        self._cols: dict[str, dict[str, list[Any]]] = {t: {f.name: [] for f in SCHEMAS[t]} for t in TABLES}
        self._last_step: dict[str, int] = {}
        self._pending = 0
        self._last_flush = time.monotonic()
        self._closed = False
        self.tb: Any = None
        if tensorboard:
            from trinity.store.tensorboard import TensorBoardWriter

            self.tb = TensorBoardWriter(node_dir.tensorboard(attempt))

    # -- logging -------------------------------------------------------------------------------

    def log_step(
        self,
        step: int,
        *,
        tokens: int | None = None,
        loss: float | None = None,
        ce_loss: float | None = None,
        aux_loss: float | None = None,
        z_loss: float | None = None,
        lr_muon: float | None = None,
        lr_adamw: float | None = None,
        grad_norm: float | None = None,
        tokens_per_s: float | None = None,
        step_time_s: float | None = None,
        batch_het: float | None = None,
        mfu: float | None = None,
        peak_mem_allocated_bytes: int | None = None,
        peak_mem_reserved_bytes: int | None = None,
        phase: str | None = None,
        time_s: float | None = None,
    ) -> None:
        """One optimizer step. `tokens` is cumulative for this node; None means not applicable.

        mfu: achieved FLOP/s per rank over the accelerator's declared bf16 peak.
        peak_mem_*_bytes: the step's peak device memory (see STEP_MEMORY).
        time_s: seconds since the epoch (default: now).
        """
        scalars = (
            loss,
            ce_loss,
            aux_loss,
            z_loss,
            lr_muon,
            lr_adamw,
            grad_norm,
            tokens_per_s,
            step_time_s,
            batch_het,
            mfu,
        )
        memory = (peak_mem_allocated_bytes, peak_mem_reserved_bytes)
        self._advance("steps", step)
        c = self._cols["steps"]
        self._key(c, step)
        c["time"].append(time.time() if time_s is None else time_s)
        c["phase"].append(phase)
        c["tokens"].append(None if tokens is None else int(tokens))
        for name, value in zip(STEP_SCALARS, scalars, strict=True):
            c[name].append(None if value is None else float(value))
        for name, nbytes in zip(STEP_MEMORY, memory, strict=True):
            c[name].append(None if nbytes is None else int(nbytes))
        if self.tb is not None:
            values: dict[str, float | None] = dict(zip(STEP_SCALARS, scalars, strict=True))
            values |= {name: None if b is None else float(b) for name, b in zip(STEP_MEMORY, memory, strict=True)}
            self.tb.log_step(step, values, tokens=tokens)
        self._pending += 1
        self._maybe_flush()

    def log_moe_layers(
        self,
        step: int,
        *,
        max_vio_L: ArrayLike,
        dead_experts_L: ArrayLike,
        bias_mean_L: ArrayLike | None = None,
        bias_std_L: ArrayLike | None = None,
        bias_min_L: ArrayLike | None = None,
        bias_max_L: ArrayLike | None = None,
    ) -> None:
        """Per-MoE-layer values of one step; each array has one entry per MoE layer (layer 0 first).

        `moe_layer_stats(counts_LE, bias_LE)` computes all of them; bias arrays may be None (no bias).
        """
        self._advance("moe_layers", step)
        vio = to_numpy(max_vio_L).astype(np.float64).ravel()
        L = vio.shape[0]
        c = self._cols["moe_layers"]
        c["run_id"].append(L)  # run/node/attempt/step are expanded to L rows at flush time
        c["step"].append(step)
        c["layer"].append(np.arange(L, dtype=np.int32))
        c["max_vio"].append(vio)
        dead = to_numpy(dead_experts_L).astype(np.int32).ravel()
        c["dead_experts"].append(dead)
        for name, arr in (
            ("bias_mean", bias_mean_L),
            ("bias_std", bias_std_L),
            ("bias_min", bias_min_L),
            ("bias_max", bias_max_L),
        ):
            c[name].append(np.full(L, np.nan) if arr is None else to_numpy(arr).astype(np.float64).ravel())
        if self.tb is not None:
            self.tb.log_moe(step, vio, dead)

    def log_expert_load(self, step: int, counts_LE: ArrayLike) -> None:
        """Tokens routed to every (MoE layer, expert) at this step; fraction = share within the layer."""
        self._advance("expert_load", step)
        n = to_numpy(counts_LE).astype(np.int64)
        c = self._cols["expert_load"]
        c["run_id"].append(n.size)
        c["step"].append(step)
        c["tokens"].append(n)
        self._maybe_flush()

    def log_moe(
        self, step: int, counts_LE: ArrayLike, bias_LE: ArrayLike | None = None, max_vio_L: ArrayLike | None = None
    ) -> None:
        """What a training step logs for its MoE layers: stats always, expert load at the cadence.

        max_vio_L: the step's MaxVio per layer as training computed it (None: from counts_LE here).
        """
        counts = to_numpy(counts_LE)
        self.log_moe_layers(step, **moe_layer_stats(counts, bias_LE, max_vio_L))
        if step % self.expert_load_every == 0:
            self.log_expert_load(step, counts)

    def log_eval(
        self,
        step: int,
        task: str,
        score: float,
        *,
        length: int | None = None,
        n: int | None = None,
        metric: str = "score",
        extra: Mapping[str, Any] | None = None,
        time_s: float | None = None,
    ) -> None:
        """One evaluation result: `task` at context `length` (tokens) over `n` examples."""
        c = self._cols["evals"]
        self._key(c, step)
        c["time"].append(time.time() if time_s is None else time_s)
        c["task"].append(task)
        c["metric"].append(metric)
        c["length"].append(length)
        c["score"].append(float(score))
        c["n"].append(n)
        c["extra"].append(None if extra is None else json.dumps(extra, sort_keys=True, default=str))
        if self.tb is not None:
            self.tb.log_eval(step, task, metric, length, float(score))
        self._pending += 1
        self._maybe_flush()

    def log_event(self, step: int, kind: str, message: str = "", **data: Any) -> None:
        """A free-form event (resumed, checkpoint committed, loss spike...) with JSON data."""
        c = self._cols["events"]
        self._key(c, step)
        c["time"].append(time.time())
        c["kind"].append(kind)
        c["message"].append(message)
        c["data"].append(json.dumps(data, sort_keys=True, default=str) if data else None)
        self._pending += 1
        self._maybe_flush()

    # -- flushing ------------------------------------------------------------------------------

    def flush(self) -> list[Path]:
        """Write every buffered row as new parts (one per non-empty table); returns their paths."""
        written = []
        for table in TABLES:
            arrow = self._take(table)
            if arrow is not None and arrow.num_rows:
                written.append(self._write_part(table, arrow))
        self._pending = 0
        self._last_flush = time.monotonic()
        if self.tb is not None:
            self.tb.flush()
        return written

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        if self.tb is not None:
            self.tb.close()
        self._closed = True

    def __enter__(self) -> TelemetryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _advance(self, table: str, step: int) -> None:
        """Steps only move forward within an attempt: the views rely on one row per step and attempt."""
        last = self._last_step.get(table)
        if last is not None and step <= last:
            raise ValueError(f"{table}: step {step} logged after step {last}; steps must increase within an attempt")
        self._last_step[table] = step

    def _key(self, c: dict[str, list[Any]], step: int) -> None:
        c["run_id"].append(self.run_id)
        c["node"].append(self.node_id)
        c["attempt"].append(self.attempt)
        c["step"].append(int(step))

    def _maybe_flush(self) -> None:
        big = sum(self._cols["expert_load"]["run_id"]) > 50 * self.flush_rows * 64
        if self._pending >= self.flush_rows or big or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _take(self, table: str) -> pa.Table | None:
        """The buffered rows of `table` as Arrow, emptying the buffer."""
        c = self._cols[table]
        if not c["step"]:
            return None
        self._cols[table] = {name: [] for name in c}
        schema = SCHEMAS[table]
        if table == "moe_layers":
            return self._expand(
                c, schema, c["run_id"], [n for n in schema.names if n not in ("run_id", "node", "attempt", "step")]
            )
        if table == "expert_load":
            sizes = c["run_id"]
            layers, experts, tokens, fractions = [], [], [], []
            for n_LE in c["tokens"]:
                L, E = n_LE.shape
                layers.append(np.repeat(np.arange(L, dtype=np.int32), E))
                experts.append(np.tile(np.arange(E, dtype=np.int32), L))
                tokens.append(n_LE.ravel())
                total = n_LE.sum(axis=1, keepdims=True)
                fractions.append((n_LE / np.where(total > 0, total, 1)).ravel())
            cols = {"layer": layers, "expert": experts, "tokens": tokens, "fraction": fractions}
            return self._expand(cols | {"step": c["step"]}, schema, sizes, list(cols))
        columns = {}
        for f in schema:
            values = c[f.name]
            if f.type == TIMESTAMP:
                columns[f.name] = pa.array((np.asarray(values, dtype=np.float64) * 1e6).astype(np.int64), TIMESTAMP)
            else:
                columns[f.name] = pa.array(values, f.type)
        return pa.table(columns, schema=schema)

    def _expand(
        self, c: Mapping[str, Sequence[Any]], schema: pa.Schema, sizes: Sequence[int], array_cols: list[str]
    ) -> pa.Table:
        """Arrow table from per-call numpy chunks; key columns repeated to each chunk's length."""
        total = int(sum(sizes))
        columns: dict[str, pa.Array] = {
            "run_id": pa.array(np.full(total, self.run_id, dtype=object), pa.string()),
            "node": pa.array(np.full(total, self.node_id, dtype=object), pa.string()),
            "attempt": pa.array(np.full(total, self.attempt, dtype=np.int32)),
            "step": pa.array(np.repeat(np.asarray(c["step"], dtype=np.int64), sizes)),
        }
        for name in array_cols:
            typ = schema.field(name).type
            arr = np.concatenate(list(c[name])) if c[name] else np.zeros(0)
            mask = np.isnan(arr) if arr.dtype.kind == "f" else None
            columns[name] = pa.array(arr, typ, mask=mask)
        return pa.table(columns, schema=schema)

    def _write_part(self, table: str, arrow: pa.Table) -> Path:
        tag = "" if self.writer is None else f"{self.writer}-"
        path = self.folder / f"{table}-{tag}{self._seq:06d}.parquet"
        self._seq += 1
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                pq.write_table(arrow, f, compression="zstd", write_page_checksum=True)  # CRC per page: verify
                f.flush()
                os.fsync(f.fileno())  # on disk before it has its name: a committed checkpoint implies it
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
