"""Randomness of a training node: named seed streams, and the process RNG states a checkpoint
carries so that a resume is exact.

Named streams: every consumer of randomness in a node draws its seed from the experiment seed and
a name saying what it is for, `stream_seed(spec.seed, "loader/pretrain/phase1")`, instead of
arithmetic on the seed (`seed * 1000 + 901`), which collides silently (phase 901 of one seed is
the extension loader of another) and says nothing to the reader. The derivation is a SHA-256 of
the seed and the name, so it is the same in every process, on every platform and Python version
(Python's `hash()` of a str is salted per process); different names give unrelated seeds.

Streams in use (STREAMS lists them; a node never invents a name elsewhere):
    model/init                 the weights of a model trained from scratch (pretraining phase 1)
    loader/pretrain/<phase>    a pretraining phase's loader
    loader/extend              context extension's document sampling
    loader/sft                 the order SFT packs its conversations in
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

STREAMS = ("model/init", "loader/pretrain/<phase>", "loader/extend", "loader/sft")
"""The named streams of a training node (the pretraining one is per phase name)."""


def stream_seed(base_seed: int, name: str) -> int:
    """A 63-bit seed for the stream `name` of experiment seed `base_seed`.

    The first 8 bytes (little-endian) of sha256("<base_seed>/<name>"), top bit cleared: non-negative
    and below 2**63, so it fits every seeding API (torch.manual_seed, numpy's SeedSequence) and an
    int64 wherever a loader stores its seed.
    """
    digest = hashlib.sha256(f"{int(base_seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU, and every CUDA device if available), numpy's global and Python's `random` states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo to what capture_rng_state saw."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
