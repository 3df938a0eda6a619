"""The run metadata the catalog loads as tables: runs, nodes, attempts (with their provenance) and spec.

Everything here is read with Python's json module from the files the executor writes (run.json,
graph.json, status.json, attempts/NNNN.json) and becomes small Arrow tables; a record that is missing or
unreadable (a node that never started) gives NULLs, never an error. `find_runs` finds run directories
below a folder. trinity.store.catalog puts these tables beside the telemetry views; docs/telemetry.md
lists every column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from trinity.errors import CatalogError
from trinity.run.graph import RunGraph
from trinity.run.layout import NodeDir, RunDir, read_json

MAX_DEPTH = 3
"""How deep below a folder `find_runs` looks for run directories (folders holding graph.json)."""


@dataclass(frozen=True)
class Run:
    root: Path
    run_id: str
    meta: dict[str, Any]
    graph: RunGraph


# -- finding and reading runs ------------------------------------------------------------------


def find_runs(path: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """`path` itself when it is a run directory, else the run directories below it (sorted)."""
    path = Path(path)
    if RunDir(path).exists():
        return [path]
    if not path.is_dir():
        raise CatalogError(f"{path}: no such directory (give a run directory or a folder of runs)")
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
                continue
            sub = Path(entry.path)
            if RunDir(sub).exists():
                found.append(sub)  # never descend into a run: its nodes hold no further runs
            elif depth < max_depth:
                walk(sub, depth + 1)

    walk(path, 1)
    if not found:
        raise CatalogError(f"{path}: no run directories (folders with graph.json) up to {max_depth} levels down")
    return found


def load_run(root: Path) -> Run:
    meta = read_json(RunDir(root).run_json) if RunDir(root).run_json.is_file() else {}
    graph = RunGraph.load(RunDir(root))
    run_id = str(meta.get("run_id") or meta.get("id") or root.name)
    return Run(root, run_id, meta, graph)


def _time(value: Any) -> datetime | None:
    """ISO 8601 (naive means UTC) or seconds since the epoch -> aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    t = datetime.fromisoformat(str(value))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _int(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


def _signal(value: Any) -> int | None:
    """A signal number (records hold ints; a name such as 'SIGTERM' is converted)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) or str(value).lstrip("-").isdigit():
        return int(value)
    import signal

    try:
        return int(signal.Signals[str(value)])
    except KeyError:
        return None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _read_optional(path: Path) -> dict[str, Any]:
    """A JSON record, or {} when it is missing or unreadable (a node that never started)."""
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def node_ids(run: Run) -> list[str]:
    return list(run.graph.nodes)


def _attempt_numbers(node: NodeDir) -> list[int]:
    numbers: set[int] = set()
    if node.attempts.is_dir():
        numbers |= {int(p.stem) for p in node.attempts.glob("*.json") if p.stem.isdigit()}
    telemetry = node.root / "telemetry"
    if telemetry.is_dir():
        numbers |= {int(p.name[8:]) for p in telemetry.glob("attempt-*") if p.name[8:].isdigit()}
    return sorted(numbers)


# -- metadata tables ---------------------------------------------------------------------------

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("name", pa.string()),
        ("created", pa.timestamp("us", tz="UTC")),
        ("trinity_version", pa.string()),
        ("path", pa.string()),
        ("n_nodes", pa.int32()),
        ("meta", pa.string()),
    ]
)
NODES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("node", pa.string()),
        ("kind", pa.string()),
        ("identity", pa.string()),
        ("deps", pa.list_(pa.string())),
        ("target", pa.string()),
        ("branch", pa.string()),
        ("position", pa.int32()),
        ("state", pa.string()),
        ("state_updated", pa.timestamp("us", tz="UTC")),
        ("status_identity", pa.string()),
        ("message", pa.string()),
        ("latest_attempt", pa.int32()),
        ("progress", pa.string()),
        ("n_attempts", pa.int32()),
    ]
)
ATTEMPTS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("node", pa.string()),
        ("attempt", pa.int32()),
        ("executor", pa.string()),
        ("job_id", pa.string()),
        ("array_index", pa.int64()),
        ("depends_on", pa.string()),
        ("host", pa.string()),
        ("pid", pa.int64()),
        ("start", pa.timestamp("us", tz="UTC")),
        ("end", pa.timestamp("us", tz="UTC")),
        ("duration_s", pa.float64()),
        ("state", pa.string()),
        ("exit_code", pa.int64()),
        ("signal", pa.int64()),
        ("resumed_from_step", pa.int64()),
        ("reused_from", pa.string()),
        ("identity", pa.string()),
        ("message", pa.string()),
        ("has_record", pa.bool_()),
        # provenance (trinity.execute.provenance): NULL for an attempt that never reached its body
        ("trinity_version", pa.string()),
        ("git_commit", pa.string()),
        ("git_dirty", pa.string()),
        ("git_note", pa.string()),
        ("python", pa.string()),
        ("torch", pa.string()),
        ("cuda", pa.string()),
        ("hosts", pa.list_(pa.string())),
        ("packages_sha256", pa.string()),
    ]
)
PROVENANCE_COLUMNS = ("trinity_version", "git_commit", "git_dirty", "git_note", "python", "torch", "cuda")
"""The text columns of `attempts` copied from an attempt record's provenance (hosts and packages_sha256 besides)."""


def runs_table(runs: Sequence[Run]) -> pa.Table:
    rows = [
        {
            "run_id": r.run_id,
            "name": _str(r.meta.get("name")),
            "created": _time(r.meta.get("created")),
            "trinity_version": _str(r.meta.get("trinity_version") or r.meta.get("version")),
            "path": str(r.root.resolve()),
            "n_nodes": len(r.graph.nodes),
            "meta": json.dumps(r.meta, sort_keys=True, default=str),
        }
        for r in runs
    ]
    return pa.Table.from_pylist(rows, RUNS_SCHEMA)


def nodes_and_attempts(runs: Sequence[Run]) -> tuple[pa.Table, pa.Table]:
    nodes, attempts = [], []
    for run in runs:
        for position, n in enumerate(run.graph.nodes.values()):
            node = RunDir(run.root).node(n.id)
            status = _read_optional(node.status)
            numbers = _attempt_numbers(node)
            nodes.append(
                {
                    "run_id": run.run_id,
                    "node": n.id,
                    "kind": n.kind,
                    "identity": n.identity,
                    "deps": list(n.deps),
                    "target": n.target,
                    "branch": n.branch,
                    "position": position,
                    "state": _str(status.get("state")) or ("PENDING" if not status else None),
                    "state_updated": _time(status.get("updated")),
                    "status_identity": _str(status.get("identity")),
                    "message": _str(status.get("message")),
                    "latest_attempt": _int(status.get("attempt")) or (max(numbers) if numbers else None),
                    "progress": json.dumps(status["progress"], sort_keys=True) if status.get("progress") else None,
                    "n_attempts": len(numbers),
                }
            )
            for a in numbers:
                rec = _read_optional(node.attempt_record(a))
                start, end = _time(rec.get("start")), _time(rec.get("end"))
                prov: dict[str, Any] = rec["provenance"] if isinstance(rec.get("provenance"), dict) else {}
                hosts = prov.get("hosts")
                attempts.append(
                    {
                        "run_id": run.run_id,
                        "node": n.id,
                        "attempt": a,
                        "executor": _str(rec.get("executor")),
                        "job_id": _str(rec.get("job_id")),
                        "array_index": _int(rec.get("array_index")),
                        "depends_on": _str(rec.get("depends_on")),
                        "host": _str(rec.get("host")),
                        "pid": _int(rec.get("pid")),
                        "start": start,
                        "end": end,
                        "duration_s": (end - start).total_seconds() if start and end else None,
                        "state": _str(rec.get("state")),
                        "exit_code": _int(rec.get("exit_code")),
                        "signal": _signal(rec.get("signal")),
                        "resumed_from_step": _int(rec.get("resumed_from_step")),
                        "reused_from": _str(rec.get("reused_from")),
                        "identity": _str(rec.get("identity")),
                        "message": _str(rec.get("message")),
                        "has_record": bool(rec),
                        **{k: _str(prov.get(k)) for k in PROVENANCE_COLUMNS},
                        "hosts": [str(h) for h in hosts] if isinstance(hosts, list) else None,
                        "packages_sha256": _str(prov.get("packages_sha256")),
                    }
                )
    return pa.Table.from_pylist(nodes, NODES_SCHEMA), pa.Table.from_pylist(attempts, ATTEMPTS_SCHEMA)


def _spec_type(values: list[Any]) -> pa.DataType:
    """One Arrow type for a spec field across nodes and runs (JSON text when they disagree)."""
    present = [v for v in values if v is not None]
    if not present:
        return pa.string()
    if all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.float64()
    if all(isinstance(v, str) for v in present):
        return pa.string()
    return pa.string()  # lists, dicts, mixed: canonical JSON text


def _spec_value(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if typ == pa.string():
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if typ == pa.float64():
        return float(value)
    return value


def spec_tables(runs: Sequence[Run]) -> tuple[pa.Table, pa.Table]:
    """`spec`: one row per (run, node), a typed column per dotted path; `spec_fields`: the same, long."""
    keys: list[tuple[str, str]] = []
    flats: list[dict[str, Any]] = []
    for run in runs:
        for n in run.graph.nodes.values():
            keys.append((run.run_id, n.id))
            flats.append(dict(n.flat_spec))
    paths = sorted({p for f in flats for p in f})
    columns: dict[str, pa.Array] = {
        "run_id": pa.array([k[0] for k in keys], pa.string()),
        "node": pa.array([k[1] for k in keys], pa.string()),
    }
    long: dict[str, list[Any]] = {"run_id": [], "node": [], "path": [], "value": [], "type": []}
    for path in paths:
        if path in ("run_id", "node"):
            continue
        values = [f.get(path) for f in flats]
        typ = _spec_type(values)
        columns[path] = pa.array([_spec_value(v, typ) for v in values], typ)
    for (run_id, node), flat in zip(keys, flats, strict=True):
        for path in sorted(flat):
            value = flat[path]
            long["run_id"].append(run_id)
            long["node"].append(node)
            long["path"].append(path)
            long["value"].append(json.dumps(value, sort_keys=True))
            long["type"].append(type(value).__name__ if value is not None else "null")
    return pa.table(columns), pa.table(long, schema=pa.schema([(k, pa.string()) for k in long]))
