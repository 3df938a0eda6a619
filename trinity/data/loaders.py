"""Building a phase's loader from its spec, and the one statistic that tells the two apart.

`build_loader(loader_spec, store, seq_len, micro_batch, rank, world, seed)` returns a
`SequentialLoader` or an `RsdbLoader` (the spec's `kind`), with the spec's `workers` (and, for RSDB,
`buffer_size`). Both yield `Batch(tokens_BT, targets_BT, doc_ids_BT)` (int64 tensors) from
`next_batch()` or by iteration, and save/restore their position with `state_dict()` /
`load_state_dict()`; the shared contract is in `trinity.data.packing`.
"""

from __future__ import annotations

import torch

from trinity.data.packing import Batch, PackedLoader
from trinity.data.rsdb import RsdbLoader
from trinity.data.sequential import SequentialLoader
from trinity.data.store import TokenStore
from trinity.spec import data as data_spec

__all__ = ["Batch", "PackedLoader", "RsdbLoader", "SequentialLoader", "build_loader", "distinct_documents"]


def build_loader(
    loader_spec: data_spec.Loader,
    store: TokenStore,
    seq_len: int,
    micro_batch: int,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
) -> PackedLoader:
    """The loader a phase's spec asks for, serving `rank` of `world` (in training: data stream s of data.streams)."""
    if isinstance(loader_spec, data_spec.RsdbLoader):
        return RsdbLoader(store, seq_len, micro_batch, rank, world, loader_spec.workers, seed, loader_spec.buffer_size)
    if isinstance(loader_spec, data_spec.SequentialLoader):
        return SequentialLoader(store, seq_len, micro_batch, rank, world, loader_spec.workers, seed)
    raise TypeError(f"unknown loader kind {type(loader_spec).__name__}")


def distinct_documents(batch: Batch) -> int:
    """Distinct documents in a micro-batch (RSDB's mixing, measured)."""
    return int(torch.unique(batch.doc_ids_BT).numel())
