"""The run directory: one per run, and nothing outside it is written (but the shared store that
`execution.store` names, when set: trinity.run.shared_store).

    RUN/
      run.json                      run id, name, creation time, trinity version
      spec.yaml                     the resolved spec (every `use:` and `--set` applied)
      graph.json                    nodes: id, kind, identity, deps, target, branch, flat_spec
      nodes/<node id>/              e.g. nodes/pretrain/phase1/ (node ids are relative paths; `RunDir.node`
                                    refuses one that would lead outside nodes/)
        status.json                 {"state": PENDING|RUNNING|SUCCEEDED|FAILED|DEP_FAILED, "identity", ...}
        lease.json                  heartbeat: rewritten every `execution.heartbeat_s` while running
        attempts/0001.json ...      one record per try: executor, job id, host, pid, start, end, exit, signal
        logs/attempt-0001.log       the node process's stdout and stderr
        outputs/                    the node's results (tokenizer.json, token store, final checkpoint link)
        checkpoints/step-00000100/  Zarr checkpoints; committed ones hold a COMMITTED marker
        telemetry/attempt-0001/     append-only Parquet parts written by that attempt alone
        tensorboard/attempt-0001/   TensorBoard event files of that attempt
        activations/step-00000010/  optional activation captures (Zarr)

      superseded/<node id>@<tag>/   a node folder moved aside when its identity changed

Every path built from a node id comes from `RunDir.node` (or `RunDir.superseded`), and every
path read from the run's own files from `RunDir.inside`: each refuses what would resolve
outside the run directory ('..', absolute paths, symbolic links pointing out).

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

from trinity.errors import RunError
from trinity.spec.names import node_id_problem


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


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that the names just created or renamed in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def refuse_escape(path: Path, what: str, allowed: Path) -> None:
    """Refuse (RunError) `path` unless it resolves, symbolic links followed, inside `allowed` (a resolved path)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic-link loop
        raise RunError(f"{what} cannot be resolved ({exc})") from exc
    if not resolved.is_relative_to(allowed):
        raise RunError(
            f"{what} resolves to {resolved}, outside {allowed} (a symbolic link?); refusing to read or write there"
        )


def path_inside(root: Path, relative: str) -> Path:
    """root/<relative> for a relative path read from a file under `root` (a run's graph.json, a node's
    final.json): refused (RunError) if it is empty, absolute, has a '..' segment, a backslash or NUL,
    or resolves outside `root`."""
    if not relative or relative.startswith("/") or "\\" in relative or "\0" in relative or ".." in relative.split("/"):
        raise RunError(f"{root}: {relative!r} is not a path inside {root}")
    path = root / relative
    refuse_escape(path, f"{root}: {relative!r}", root.resolve())
    return path


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

    def inside(self, relative: str) -> Path:
        """<node folder>/<relative> for a path read from the node's own files (final.json's
        `checkpoint`), refused (RunError) if it would lead outside the node folder."""
        return path_inside(self.root, relative)


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

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    def node(self, node_id: str) -> NodeDir:
        """The folder of node `node_id`: RUN/nodes/<node id>. Every path built from a node id goes
        through here.

        Refuses (RunError) an id that is not a relative path of plain segments (`node_id_problem`:
        '..', an absolute path, an empty segment, NUL) and one whose folder resolves outside
        RUN/nodes through a symbolic link (RUN/nodes itself included).
        """
        problem = node_id_problem(node_id)
        if problem is not None:
            raise RunError(f"{self.root}: node id {node_id!r} {problem}; refusing to use it as a path under nodes/")
        path = self.nodes / node_id
        self._refuse_escape(path, f"node id {node_id!r}", self.root.resolve() / "nodes")
        return NodeDir(path)

    def superseded(self, node_id: str, tag: str) -> Path:
        """RUN/superseded/<node id>@<tag>: where a node folder whose identity changed is moved aside.
        `tag` (e.g. the old identity's prefix and a time stamp, read from status.json) must be one
        plain segment; the id is checked as `node` checks it."""
        self.node(node_id)
        problem = node_id_problem(tag)
        if problem is not None or "/" in tag:
            raise RunError(f"{self.root}: {tag!r} cannot name a superseded folder ({problem or 'contains /'})")
        path = self.root / "superseded" / f"{node_id}@{tag}"
        self._refuse_escape(path, f"superseded folder of {node_id!r}", self.root.resolve() / "superseded")
        return path

    def inside(self, relative: str) -> Path:
        """RUN/<relative> for a path read from the run's own files (graph.json's `spec_file`), refused
        (RunError) if it is absolute, has '..' or resolves outside the run directory."""
        return path_inside(self.root, relative)

    def _refuse_escape(self, path: Path, what: str, allowed: Path) -> None:
        refuse_escape(path, f"{self.root}: {what}", allowed)

    def exists(self) -> bool:
        return self.graph_json.is_file()
