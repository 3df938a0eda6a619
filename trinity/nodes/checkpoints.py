"""Training checkpoints of a node: what goes in, where they live, and which one a node resumes from.

The storage itself is `trinity.store.checkpoint` (Zarr: save, load) and
`trinity.store.checkpoint_commit` (atomic commit, retention, which one is newest); asynchronous saves
(`execution.checkpoint.async`) go through `trinity.store.checkpoint_async`. A training
checkpoint holds the model (expert bias and momentum are buffers in its state dict), the
optimizer, the loader position, every RNG state, the step and the tokens seen, and the node
identity it belongs to: a node resumes only from checkpoints of its own identity.

A resume uses the newest committed checkpoint that loads intact (every file as its commit marker's
checksums say, trinity.store.checkpoint_integrity). A newer one found damaged is renamed aside to
`step-XXXXXXXX.damaged` (trinity.store.checkpoint_commit.set_aside): kept for the user to inspect,
never pruned, never resumed from again, never replaced by a later save of the same step; the
training loop logs it and records an `events` row of kind "checkpoint_damaged". If no committed
checkpoint is intact, nothing is set aside and the resume fails with the newest one's path and array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trinity.distributed import step as collective
from trinity.errors import CheckpointError
from trinity.graph.init_sources import init_of
from trinity.run.layout import NodeDir, atomic_write_json, read_json
from trinity.run.status import NodeStatus
from trinity.spec.execution import CheckpointSpec
from trinity.store.checkpoint import load_checkpoint, save_checkpoint
from trinity.store.checkpoint_async import AsyncCheckpointer, checkpoint_path
from trinity.store.checkpoint_commit import latest_committed, list_checkpoints, set_aside

if TYPE_CHECKING:
    from trinity.nodes.context import NodeContext
    from trinity.spec.experiment import ExperimentSpec

FINAL = "final.json"


def last_committed_step(node_dir: NodeDir) -> int | None:
    """Step of the newest committed checkpoint of the node (as its commit marker records it), or None."""
    latest = latest_committed(node_dir.checkpoints)
    return None if latest is None else latest.step


def save_training_state(
    node_dir: NodeDir,
    step: int,
    state: dict[str, Any],
    policy: CheckpointSpec,
    *,
    protected: frozenset[int] = frozenset(),
    saver: AsyncCheckpointer | None = None,
) -> Path:
    """Commit `state` as the node's checkpoint `step` and prune by `policy` (keep the last
    `policy.keep_last`, every multiple of `policy.keep_every`, and the `protected` steps that downstream
    nodes reference). With `saver` the save is asynchronous: this returns once the state is copied to
    host memory, with the path the checkpoint will be committed at (`saver.wait()` commits it)."""
    args = (node_dir.checkpoints, step, state, policy.keep_last)
    kwargs: dict[str, Any] = dict(keep_every=policy.keep_every, protected=protected, compression=policy.compression)
    if saver is None:
        return save_checkpoint(*args, **kwargs)
    saver.submit(*args, **kwargs)
    return checkpoint_path(node_dir.checkpoints, step)


@dataclass(frozen=True)
class Damaged:
    """A committed checkpoint a resume found damaged, and where it was set aside."""

    step: int
    path: Path
    set_aside: Path
    error: str


def resume_state(
    node_dir: NodeDir, identity: str, like: dict[str, Any] | None = None, damaged: list[Damaged] | None = None
) -> dict[str, Any] | None:
    """The state of the newest committed checkpoint that is intact, if it belongs to this identity
    (resharded to `like`'s layout); None if there is none.

    Newer damaged checkpoints are set aside and appended to `damaged`; if every committed checkpoint
    is damaged, a CheckpointError names the newest one's path and array and nothing is set aside.
    With many ranks every rank calls this (each checks what it reads): a checkpoint damaged for any
    rank is damaged for all, so they all resume from the same step.
    """
    committed = [c for c in list_checkpoints(node_dir.checkpoints) if c.committed]
    errors: list[tuple[int, Path, str]] = []
    for candidate in reversed(committed):
        error: CheckpointError | None = None
        state: dict[str, Any] | None = None
        try:
            state = load_checkpoint(candidate.path, like=like)
        except CheckpointError as exc:
            error = exc
        if collective.any_rank(error is not None):
            errors.append((candidate.step, candidate.path, str(error) if error else "damaged (found by another rank)"))
            continue
        assert state is not None
        for step, path, message in errors:
            aside = set_aside(path) if collective.rank() == 0 else path.with_name(f"{path.name}.damaged")
            if damaged is not None:
                damaged.append(Damaged(step, path, aside, message))
        collective.barrier()
        return state if state.get("identity") == identity else None
    if errors:
        newest = errors[0][2]
        older = f"; the {len(errors) - 1} older committed checkpoints are damaged too" if len(errors) > 1 else ""
        raise CheckpointError(
            f"{newest}{older}. No intact checkpoint to resume from: restore the files, or move "
            f"{node_dir.checkpoints} aside to start the node over"
        )
    return None


def referenced_steps(ctx: NodeContext) -> frozenset[int]:
    """Steps of this node that other nodes of the run start from (`init: {from: NODE@STEP}` of their
    stage, in any sweep branch), and those an eval during training has yet to score (until that eval
    SUCCEEDED, trinity.graph.during): retention keeps them however old they are (the final one is kept anyway)."""
    base = ctx.node_id.split("[", 1)[0]
    specs: dict[str, ExperimentSpec] = {}
    steps: set[int] = set()
    for node in ctx.graph.nodes.values():
        if ctx.node_id not in node.deps:
            continue
        after = node.after_checkpoint
        if after is not None and after.node == ctx.node_id:
            if NodeStatus.read(ctx.run.node(node.id)).state != "SUCCEEDED":
                steps.add(after.step)
            continue
        if node.spec_file not in specs:
            specs[node.spec_file] = ctx.graph.spec(node)
        init = init_of(specs[node.spec_file], node.id.split("[", 1)[0])
        if init is not None and init.from_node == base:
            step = init.from_step if init.from_step is not None else init.step
            if step is not None:
                steps.add(step)
    return frozenset(steps)


def write_final(node_dir: NodeDir, checkpoint: Path, step: int, tokens: int, metrics: dict[str, Any]) -> None:
    """outputs/final.json: the checkpoint downstream nodes start from (never pruned: it is the newest)."""
    atomic_write_json(
        node_dir.outputs / FINAL,
        {"checkpoint": str(checkpoint.relative_to(node_dir.root)), "step": step, "tokens": tokens, **metrics},
    )


def final_state(node_dir: NodeDir, like: dict[str, Any] | None = None) -> dict[str, Any]:
    """The final checkpoint of a finished training node (resharded to `like`'s layout when given)."""
    final = read_json(node_dir.outputs / FINAL)
    path = node_dir.inside(str(final["checkpoint"]))
    return load_checkpoint(path, like=like)
