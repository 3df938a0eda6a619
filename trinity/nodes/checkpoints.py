"""Training checkpoints of a node: what goes in, where they live, and which one a node resumes from.

The storage itself (Zarr, atomic commit, keep-last-K) is `trinity.store.checkpoint`. A training
checkpoint holds the model (expert bias and momentum are buffers in its state dict), the
optimizer, the loader position, every RNG state, the step and the tokens seen, and the node
identity it belongs to: a node resumes only from checkpoints of its own identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trinity.run.layout import NodeDir, atomic_write_json, read_json
from trinity.store.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

FINAL = "final.json"


def last_committed_step(node_dir: NodeDir) -> int | None:
    """Step of the newest committed checkpoint of the node, or None."""
    path = latest_checkpoint(node_dir.checkpoints) if node_dir.checkpoints.is_dir() else None
    return int(path.name.split("-")[-1]) if path is not None else None


def save_training_state(node_dir: NodeDir, step: int, state: dict[str, Any], keep_last: int) -> Path:
    return save_checkpoint(node_dir.checkpoints, step, state, keep_last=keep_last)


def resume_state(node_dir: NodeDir, identity: str, like: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The newest committed checkpoint's state, if it belongs to this identity (resharded to `like`'s layout)."""
    path = latest_checkpoint(node_dir.checkpoints) if node_dir.checkpoints.is_dir() else None
    if path is None:
        return None
    state = load_checkpoint(path, like=like) if like is not None else load_checkpoint(path)
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
    return load_checkpoint(path, like=like) if like is not None else load_checkpoint(path)
