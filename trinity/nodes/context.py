"""What a node body receives: its spec, its folders, its dependencies' folders, and ways to report.

Node bodies know nothing of executors: the same body runs as a local subprocess or a Slurm job.
A training node with several ranks runs its body in every rank's process; only rank 0 (the
primary) writes the node's status, attempt record, heartbeat and progress.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trinity.execute.rundir import NodeDir, RunDir
from trinity.execute.status import NodeStatus
from trinity.spec.experiment import ExperimentSpec


class NodeFailure(RuntimeError):
    """A node cannot finish; the message is what the user reads in `trinity status`."""


class StopRequested(Exception):
    """The executor asked the node to stop (Ctrl-C, preemption, time limit)."""


class StopFlag:
    """A stop request, set from signal handlers and read by the body between steps.

    Deliberately not a threading.Event: Event.set() takes a non-reentrant lock, and on Slurm two
    signals arrive together (the job's USR2 and the submitit wrapper's SIGTERM), so the second
    handler could interrupt the first inside set() and wait on that lock forever; a rank hung
    that way mid-step and its peer with it. Setting a bool is safe to re-enter.
    """

    def __init__(self) -> None:
        self._requested = False

    def set(self) -> None:
        self._requested = True

    def is_set(self) -> bool:
        return self._requested


@dataclass
class NodeContext:
    run: RunDir
    node: dict[str, Any]
    """The node's graph.json entry: id, kind, identity, deps, target, branch, flat_spec."""
    spec: ExperimentSpec
    base_dir: Path
    """Relative data paths in the spec are relative to this folder (the graph file's)."""
    attempt: int
    run_id: str
    executor: str = "local"
    stop_event: StopFlag = field(default_factory=StopFlag)
    checks_stop: bool = False
    """A body that polls `stop_event` (training) sets this; others are interrupted at once."""
    rank: int = 0
    """This process's rank in the node's torch.distributed job (0 for a single process)."""
    world_size: int = 1
    """Processes running this attempt together (parallel.nodes x parallel.gpus_per_node for training)."""

    @property
    def is_primary(self) -> bool:
        """Rank 0: the process that writes the node's status, records and progress."""
        return self.rank == 0

    @property
    def node_id(self) -> str:
        return str(self.node["id"])

    @property
    def kind(self) -> str:
        return str(self.node["kind"])

    @property
    def dir(self) -> NodeDir:
        return self.run.node(self.node_id)

    def dep_dir(self, kind: str, target: str | None = None) -> NodeDir:
        """The folder of the dependency of `kind` (and `target`, e.g. a phase name)."""
        graph = {n["id"]: n for n in _graph_nodes(self.run)}
        for dep in self.node["deps"]:
            entry = graph[dep]
            if entry["kind"] == kind and (target is None or entry["target"] == target):
                return self.run.node(dep)
        raise NodeFailure(f"{self.node_id} has no {kind} dependency" + (f" for {target!r}" if target else ""))

    def progress(self, **values: Any) -> None:
        """Publish training progress (step, total_steps, loss, tokens_per_s) in status.json (rank 0 only)."""
        if not self.is_primary:
            return
        status = NodeStatus.read(self.dir)
        status.progress = {**status.progress, **values}
        status.write(self.dir)


def _graph_nodes(run: RunDir) -> list[dict[str, Any]]:
    from trinity.execute.rundir import read_json

    return list(read_json(run.graph_json)["nodes"])
