"""What a node body receives: its spec, its folders, its dependencies' folders, and ways to report.

Node bodies know nothing of executors: the same body runs as a local subprocess or a Slurm job.
A training node with several ranks runs its body in every rank's process; only rank 0 (the
primary) writes the node's status, attempt record, heartbeat and progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trinity.errors import NodeFailure
from trinity.run.graph import GraphNode, RunGraph
from trinity.run.layout import NodeDir, RunDir
from trinity.run.status import NodeStatus, StepProgress
from trinity.spec.experiment import ExperimentSpec


class StopFlag:
    """A stop request, set from signal handlers and read by the body between steps.

    Deliberately not a threading.Event: Event.set() takes a non-reentrant lock, and on Slurm two
    signals arrive together (the job's USR2 and the submitit wrapper's SIGTERM), so the second
    handler could interrupt the first inside set() and wait on that lock forever; a rank hung
    that way mid-step and its peer with it. Setting a bool is safe to re-enter.

    `reason` says why (e.g. the scheduler that launched the node is gone); the first one set stays.
    """

    def __init__(self) -> None:
        self._requested = False
        self.reason = ""

    def set(self, reason: str = "") -> None:
        if not self._requested:
            self.reason = reason
        self._requested = True

    def is_set(self) -> bool:
        return self._requested


@dataclass
class NodeContext:
    graph: RunGraph
    """The run's compiled graph (graph.json), read once when the attempt starts."""
    node: GraphNode
    """This node's entry in it: id, kind, identity, deps, target, branch, flat_spec."""
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
    on_progress: Callable[[dict[str, Any]], None] | None = None
    """Called with each progress report after it is written (the attempt writes it to the node's log)."""
    steps: StepProgress = field(init=False)
    """The optimizer steps this attempt completed, which rank 0's heartbeat lease carries (the stall rule)."""

    def __post_init__(self) -> None:
        self.steps = StepProgress(self.spec.execution.watchdog)

    def step_done(self, step: int, seconds: float) -> None:
        """Optimizer step `step` completed in `seconds` (the heartbeat lease tells the watchdog)."""
        self.steps.step_done(step, seconds)

    def before_step(self, step: int) -> None:
        """Fault injection (execution.inject, tests only): in the node's attempt 1, rank `hang_rank` sleeps
        `hang_s` right before optimizer step `hang_at_step`, as a hung rank would (its peers then wait in the
        next collective). A stop request does not end the sleep; the watchdog's kill does."""
        inject = self.spec.execution.inject
        if inject is None or inject.hang_at_step != step or self.attempt != 1 or self.rank != inject.hang_rank:
            return
        print(f"trinity: {self.node_id}: rank {self.rank} hangs for {inject.hang_s:g} s (execution.inject)", flush=True)
        time.sleep(inject.hang_s)  # a signal handler that returns does not end it (PEP 475)

    @property
    def is_primary(self) -> bool:
        """Rank 0: the process that writes the node's status, records and progress."""
        return self.rank == 0

    @property
    def run(self) -> RunDir:
        return self.graph.run

    @property
    def node_id(self) -> str:
        return self.node.id

    @property
    def kind(self) -> str:
        return self.node.kind

    @property
    def dir(self) -> NodeDir:
        return self.run.node(self.node_id)

    def dep_dir(self, kind: str, target: str | None = None) -> NodeDir:
        """The folder of the direct dependency of `kind` (and `target`, e.g. a phase name)."""
        dep = self.graph.dep(self.node_id, kind, target)
        if dep is None:
            raise NodeFailure(f"{self.node_id} has no {kind} dependency" + (f" for {target!r}" if target else ""))
        return self.run.node(dep.id)

    def upstream_dir(self, kind: str) -> NodeDir:
        """The folder of the nearest node of `kind` upstream of this one, directly or not."""
        found = self.graph.upstream(self.node_id, kind)
        if not found:
            raise NodeFailure(f"{self.node_id} has no upstream {kind} node")
        return self.run.node(found[0].id)

    def progress(self, **values: Any) -> None:
        """Publish training progress (step, total_steps, loss, tokens_per_s) in status.json (rank 0 only)."""
        if not self.is_primary:
            return
        status = NodeStatus.read(self.dir)
        status.progress = {**status.progress, **values}
        status.write(self.dir)
        if self.on_progress is not None:
            self.on_progress(values)


def set_threads(ctx: NodeContext) -> None:
    """Intra-op threads of this process as `execution.local.threads` says (unset: torch's default)."""
    threads = ctx.spec.execution.local.threads
    if threads:
        import torch  # here: a context is built for every node kind, and most never load torch

        torch.set_num_threads(threads)
