"""When an eval of an intermediate checkpoint may start (trinity.graph.during), for both executors.

Such a node (`after_checkpoint = {node, step}`) reads checkpoint `step` of a training node that may still be
running. It is ready when every other dependency SUCCEEDED and that training node has COMMITTED its
checkpoint at `step` (a commit marker makes it whole: trinity.store.checkpoint_commit), or SUCCEEDED (the
checkpoint was committed before, and retention kept it for this eval: trinity.nodes.checkpoints.referenced_steps).
When the training node fails, the evals of the checkpoints it did commit still run; the others are DEP_FAILED.

Locally such evals run beside training without pausing it: they take free `jobs` slots when there are any, and
otherwise one slot of their own beyond `jobs` (one such eval at a time), so the plain `trinity run GRAPH`
(jobs = 1) scores checkpoints while its one training node trains. Slurm submits them once ready
(trinity.execute.slurm).
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx

from trinity.graph.during import AfterCheckpoint
from trinity.run.layout import RunDir
from trinity.run.status import NodeStatus
from trinity.store.checkpoint_commit import list_checkpoints


def after_checkpoint(graph: nx.DiGraph, node_id: str) -> AfterCheckpoint | None:
    """The checkpoint an eval during training reads (None for every other node)."""
    after: AfterCheckpoint | None = getattr(graph.nodes[node_id]["node"], "after_checkpoint", None)
    return after


def committed(run: RunDir, after: AfterCheckpoint) -> bool:
    """Whether the training node has committed its checkpoint at `after.step` (it may have been pruned since,
    once its eval succeeded: then nobody waits for it)."""
    return any(c.step == after.step and c.committed for c in list_checkpoints(run.node(after.node).checkpoints))


def ready(run: RunDir, graph: nx.DiGraph, node_id: str) -> bool:
    """Whether the node may start: its dependencies SUCCEEDED, or (for an eval during training) its training
    node committed the checkpoint it reads."""
    after = after_checkpoint(graph, node_id)
    for dep in graph.predecessors(node_id):
        state = NodeStatus.read(run.node(dep)).state
        if state == "SUCCEEDED":
            continue
        if after is None or dep != after.node or not committed(run, after):
            return False
    return True


def has_room(graph: nx.DiGraph, node_id: str, running: Iterable[str], used: int, jobs: int) -> bool:
    """Slot rule of the local scheduler for an eval during training: a free slot of `jobs`, or its own one
    beyond them while no other eval during training runs."""
    if used + 1 <= jobs:
        return True
    return not any(after_checkpoint(graph, n) is not None for n in running)


def still_readable(run: RunDir, graph: nx.DiGraph, failed: str) -> set[str]:
    """The evals during training of `failed` (a node that just failed) whose checkpoint it had committed: they
    may still run, unlike the rest of what is downstream of it."""
    out: set[str] = set()
    for node_id in graph.successors(failed):
        after = after_checkpoint(graph, node_id)
        if after is not None and after.node == failed and committed(run, after):
            out.add(node_id)
    return out
