"""The record of a node's loss-spike rollbacks: NodeDir.root / "rollbacks.json".

A rollback (stability.spikes.action = rollback) ends the attempt at a spike and starts a new one from
the last committed checkpoint before it, at step `to_step`; the new attempt must not train on the data
that caused the spike. The record says which data that is, by position in the node's stream of
micro-batches: `from_drawn` is the number of global micro-batches drawn when the checkpoint at
`to_step` was taken (after any earlier rollback's skip there), `skip` is how many the steps
to_step+1 .. spike_step drew. An attempt that starts at step s with `d` micro-batches drawn discards
the window of every record with (to_step, from_drawn) = (s, d), in the order they were written (a
second rollback to the same checkpoint starts where the first one's window ends). An attempt that
resumes from a later checkpoint has drawn past the window already (its loader state moved on), so
it matches nothing: nothing is skipped twice, and a resume from `to_step` again skips again.

The file survives the rollback (it lives beside the attempts, not in a checkpoint), so it also
counts the node's rollback actions toward stability.spikes.max_actions. Rank 0 writes it, atomically,
before the attempt ends; every rank reads it when the next attempt starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trinity.run.layout import NodeDir, atomic_write_json, read_json

FILE = "rollbacks.json"


@dataclass(frozen=True)
class Rollback:
    """One rollback: the spike, the checkpoint step it returns to, the data window to skip."""

    spike_step: int
    loss: float
    to_step: int
    """The step of the last committed checkpoint before the spike (or the node's start without one)."""
    from_drawn: int
    """Global micro-batches drawn at `to_step` (where the window to skip begins)."""
    skip: int
    """Global micro-batches the steps to_step+1 .. spike_step drew (the window to skip)."""
    attempt: int


def read_rollbacks(node_dir: NodeDir) -> list[Rollback]:
    """The node's rollbacks, oldest first ([] when it has none)."""
    path = node_dir.root / FILE
    if not path.is_file():
        return []
    return [Rollback(**entry) for entry in read_json(path)["rollbacks"]]


def append_rollback(node_dir: NodeDir, rollback: Rollback) -> None:
    """Add `rollback` to the record (atomically: a reader sees the old list or the new one)."""
    entries = [asdict(r) for r in read_rollbacks(node_dir)] + [asdict(rollback)]
    atomic_write_json(node_dir.root / FILE, {"rollbacks": entries})


def windows_to_skip(rollbacks: list[Rollback], step: int, drawn: int) -> list[Rollback]:
    """The rollbacks whose windows an attempt starting at `step` with `drawn` micro-batches drawn must
    discard, in order (each begins where the previous ends)."""
    out: list[Rollback] = []
    for r in rollbacks:
        if r.to_step == step and r.from_drawn == drawn:
            out.append(r)
            drawn += r.skip
    return out
