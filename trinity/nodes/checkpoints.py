"""Training checkpoints of a node: what goes in, where they live, and which one a node resumes from.

The storage itself is `trinity.store.checkpoint` (Zarr: save, load) and
`trinity.store.checkpoint_commit` (atomic commit, keep-last-K, which one is newest). A training
checkpoint holds the model (expert bias and momentum are buffers in its state dict), the
optimizer, the loader position, every RNG state, the step and the tokens seen, and the node
identity it belongs to: a node resumes only from checkpoints of its own identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trinity.run.layout import NodeDir, atomic_write_json, read_json
from trinity.store.checkpoint import load_checkpoint, save_checkpoint
from trinity.store.checkpoint_commit import latest_checkpoint, latest_committed

FINAL = "final.json"


def last_committed_step(node_dir: NodeDir) -> int | None:
    """Step of the newest committed checkpoint of the node (as its commit marker records it), or None."""
    latest = latest_committed(node_dir.checkpoints)
    return None if latest is None else latest.step


def save_training_state(node_dir: NodeDir, step: int, state: dict[str, Any], keep_last: int) -> Path:
    return save_checkpoint(node_dir.checkpoints, step, state, keep_last=keep_last)


def resume_state(node_dir: NodeDir, identity: str, like: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The newest committed checkpoint's state, if it belongs to this identity (resharded to `like`'s layout)."""
    path = latest_checkpoint(node_dir.checkpoints)
    if path is None:
        return None
    state = load_checkpoint(path, like=like)
    if state.get("identity") != identity:
        return None
    return state


def write_final(node_dir: NodeDir, checkpoint: Path, step: int, tokens: int, metrics: dict[str, Any]) -> None:
    """outputs/final.json: the checkpoint downstream nodes start from (never pruned: it is the newest)."""
    atomic_write_json(
        node_dir.outputs / FINAL,
        {"checkpoint": str(checkpoint.relative_to(node_dir.root)), "step": step, "tokens": tokens, **metrics},
    )


def final_state(node_dir: NodeDir, like: dict[str, Any] | None = None) -> dict[str, Any]:
    """The final checkpoint of a finished training node (resharded to `like`'s layout when given)."""
    final = read_json(node_dir.outputs / FINAL)
    path = node_dir.root / final["checkpoint"]
    return load_checkpoint(path, like=like)
