"""Activation checkpointing of the transformer blocks (parallel.activation_checkpointing).

PLACEHOLDER while it is being written: the signature is the contract.
"""

from __future__ import annotations

from trinity.model.transformer import TrinityModel
from trinity.spec.parallel import ParallelSpec


def apply_activation_checkpointing(model: TrinityModel, parallel: ParallelSpec) -> None:
    """Wrap `model`'s blocks in place as `parallel.activation_checkpointing` asks (before any sharding)."""
    return None
