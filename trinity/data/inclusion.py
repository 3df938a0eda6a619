"""Inclusion sampling for context extension, the paper's rule (PAPER.md 6: long documents are sampled with a
length bias): each document is included in a pass with a probability that grows with its length, once.

Pass e over the extension store (e = 0, 1, 2, ...):
- document i is included with probability p(len_i) (the curve of `trinity.spec.stages.InclusionSampling`,
  `inclusion_probabilities`), independently of the other documents, by comparing the i-th uniform of
  `default_rng([seed, e, 0x1C1])` with p(len_i);
- the included documents are put in a random order, `default_rng([seed, e, 0x0D3])`;
- stream s of S (S = data.streams x loader workers) reads the included documents at positions s, s + S,
  s + 2S, ... of that order, each once, packed as the stage's loader says (`sequential`:
  `trinity.data.sequential`'s stream; `rsdb`: `trinity.data.rsdb`'s buffer). The inclusion draw and the order
  depend on the seed and the pass only, never on the stream, so the S streams split ONE inclusion set:
  within a pass no document is read twice, across all streams and workers, and their union is the set;
- a stream that finishes its share goes on with its share of pass e + 1, a new, independent draw. A pass
  may give a stream nothing (few included documents, many streams): the stream then moves on to the next
  pass (p_min > 0, so every pass has a chance to include each document).

This is `trinity.data.packing`'s epoch contract with the epoch's permutation replaced by the pass's included
documents in random order: the pass plays the epoch's part in document ids (pass x n_docs + doc, unique per
draw for intra-document masking; `doc_id % n_docs` indexes the store), and a stream's state is the same plain
ints as the sequential or RSDB stream's (pass, position, head, buffer), exact on resume.

The store holds `stages.extend.tokens` tokens, of which a pass reads about sum_i len_i p(len_i) (what the
inclusion curve keeps); the stage's budget is reached by reading several passes, each a new draw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trinity.data.packing import EpochOrder, PackedLoader, Stream
from trinity.data.rsdb import RsdbStream
from trinity.data.sequential import SequentialStream
from trinity.data.store import TokenStore
from trinity.spec.stages import InclusionSampling


def inclusion_probabilities(lengths: np.ndarray, curve: InclusionSampling) -> np.ndarray:
    """p(len) of each document (float64): p_min up to min_tokens, p_max from full_at_tokens, linear in
    log(length) between them."""
    n = np.asarray(lengths, dtype=np.float64)
    frac = np.log(np.maximum(n, curve.min_tokens) / curve.min_tokens) / np.log(curve.full_at_tokens / curve.min_tokens)
    out: np.ndarray = curve.p_min + (curve.p_max - curve.p_min) * np.clip(frac, 0.0, 1.0)
    return out


class InclusionOrder(EpochOrder):
    """The documents a stream owns in each pass: its share of the pass's included documents, in random order."""

    def __init__(self, p: np.ndarray, stream: int, n_streams: int, seed: int) -> None:
        super().__init__(len(p), stream, n_streams, seed)
        self.p = p
        """Each document's inclusion probability (shared by the streams of a loader)."""

    def included(self, epoch: int) -> np.ndarray:
        """All documents included in pass `epoch`, in the pass's random order (the same for every stream)."""
        u = np.random.default_rng([self.seed, epoch, 0x1C1]).random(self.n_docs)
        kept = np.flatnonzero(u < self.p)
        return kept[np.random.default_rng([self.seed, epoch, 0x0D3]).permutation(len(kept))]

    def docs(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._docs, self._epoch = self.included(epoch)[self.stream :: self.n_streams].copy(), epoch
        return self._docs


class InclusionSequentialStream(SequentialStream):
    """Sequential packing of the stream's included documents, pass after pass."""

    def __init__(self, store: TokenStore, seq_len: int, stream: int, n_streams: int, seed: int, p: np.ndarray) -> None:
        super().__init__(store, seq_len, stream, n_streams, seed)
        self.order = InclusionOrder(p, stream, n_streams, seed)


class InclusionRsdbStream(RsdbStream):
    """RSDB whose buffer is refilled with the stream's included documents, pass after pass."""

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        stream: int,
        n_streams: int,
        seed: int,
        buffer_size: int,
        p: np.ndarray,
    ) -> None:
        super().__init__(store, seq_len, stream, n_streams, seed, buffer_size)
        self.order = InclusionOrder(p, stream, n_streams, seed)


class InclusionLoader(PackedLoader):
    """A rank's loader of inclusion-sampled passes: `rsdb` (buffer_size > 0) or `sequential` streams."""

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        micro_batch: int,
        curve: InclusionSampling,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        seed: int = 0,
        buffer_size: int = 0,
    ) -> None:
        self.curve, self.buffer_size = curve, buffer_size
        self.p = inclusion_probabilities(store.doc_lengths, curve)
        self.kind = "inclusion_rsdb" if buffer_size > 0 else "inclusion_sequential"
        super().__init__(store, seq_len, micro_batch, rank, world, workers, seed)

    def make_stream(self, stream: int, n_streams: int) -> Stream:
        if self.buffer_size > 0:
            per_worker = max(1, self.buffer_size // self.workers)
            return InclusionRsdbStream(self.store, self.seq_len, stream, n_streams, self.seed, per_worker, self.p)
        return InclusionSequentialStream(self.store, self.seq_len, stream, n_streams, self.seed, self.p)

    def config(self) -> dict[str, Any]:
        curve = self.curve.model_dump(mode="json")
        return {**super().config(), "curve": curve, "buffer_size": self.buffer_size}
