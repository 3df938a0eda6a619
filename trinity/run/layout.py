"""The run directory: one per run, and nothing outside it is written.

    RUN/
      run.json                      run id, name, creation time, trinity version
      spec.yaml                     the resolved spec (every `use:` and `--set` applied)
      graph.json                    nodes: id, kind, identity, deps, target, branch, flat_spec
      nodes/<node id>/              e.g. nodes/pretrain/phase1/ (node ids are relative paths)
        status.json                 {"state": PENDING|RUNNING|SUCCEEDED|FAILED|DEP_FAILED, "identity", ...}
        lease.json                  heartbeat: rewritten every `execution.heartbeat_s` while running
        attempts/0001.json ...      one record per try: executor, job id, host, pid, start, end, exit, signal
        logs/attempt-0001.log       the node process's stdout and stderr
        outputs/                    the node's results (tokenizer.json, token store, final checkpoint link)
        checkpoints/step-00000100/  Zarr checkpoints; committed ones hold a COMMITTED marker
        telemetry/attempt-0001/     append-only Parquet parts written by that attempt alone
        tensorboard/attempt-0001/   TensorBoard event files of that attempt
        activations/step-00000010/  optional activation captures (Zarr)

Every file a reader might see half-written (status, attempts, lease, graph) is written to a
temporary name in the same folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class NodeDir:
    """Paths inside one node's folder."""

    root: Path

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def lease(self) -> Path:
        return self.root / "lease.json"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    def telemetry(self, attempt: int) -> Path:
        return self.root / "telemetry" / f"attempt-{attempt:04d}"

    def tensorboard(self, attempt: int) -> Path:
        return self.root / "tensorboard" / f"attempt-{attempt:04d}"

    def attempt_record(self, attempt: int) -> Path:
        return self.attempts / f"{attempt:04d}.json"

    def log_file(self, attempt: int) -> Path:
        return self.logs / f"attempt-{attempt:04d}.log"


@dataclass(frozen=True)
class RunDir:
    """Paths of a run directory."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def spec_yaml(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def graph_json(self) -> Path:
        return self.root / "graph.json"

    def node(self, node_id: str) -> NodeDir:
        return NodeDir(self.root / "nodes" / node_id)

    def exists(self) -> bool:
        return self.graph_json.is_file()
