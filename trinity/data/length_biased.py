"""Length-biased document sampling for context extension (PAPER.md 6: long documents are sampled with a bias).

The rule of `stages.extend` when `sampling` is unset (trinity's rule before the paper's; the paper's, each
document once per pass with a probability that grows with its length, is `trinity.data.inclusion`).

Document i is drawn with probability p_i = len_i**bias / sum_j len_j**bias (bias 0: uniform over
documents; bias 1: proportional to length, i.e. a token picked uniformly lies in document i with
probability p_i). Draws are independent and with replacement: a long document may come back many
times, which is the point of the bias when long documents are rare.

Two stream kinds, chosen by the stage's `loader` spec, both following the packing contract of
`trinity.data.packing` (full sequences, targets never cross documents, exact `state_dict`):
- `sequential`: each drawn document is read from its start; what does not fit continues at the
  start of the next sequence. Long documents thus fill whole training sequences contiguously,
  which is what a longer context needs.
- `rsdb`: the RSDB buffer (`trinity.data.rsdb`), refilled with drawn documents instead of the
  epoch order.
Each draw k of a stream counts as its own "epoch" in the segments, so its document id
(k x n_docs + doc) is unique per draw (two draws of one document are two documents for
intra-document masking) and `doc_id % n_docs` still indexes the store.

Randomness is counter-based as in RSDB: draw k of stream s uses the k-th uniform of blocks drawn
from `default_rng([seed, s, block, 0x1E9])`, so a stream's state is plain ints.

Data streams (`data.streams`, trinity.distributed.data): stream s of S is the loader of "rank s of
S" (`rank=s, world=S`), whose worker streams s x workers + w draw independently. The documents are
not split between streams: draws are independent and with replacement, so S streams draw from the
same distribution as one, and a rare long document stays reachable from every stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trinity.data.packing import PackedLoader, Segment, Stream
from trinity.data.rsdb import RsdbStream
from trinity.data.store import TokenStore

DRAW_BLOCK = 4096


def length_probabilities(lengths: np.ndarray, bias: float) -> np.ndarray:
    """p_i proportional to lengths_i ** bias (float64, sums to 1)."""
    w: np.ndarray = np.asarray(lengths, dtype=np.float64) ** float(bias)
    return w / float(w.sum())


class BiasedDraws:
    """The k-th document drawn by one stream, for any k (counter-based, no hidden state)."""

    def __init__(self, store: TokenStore, bias: float, seed: int, stream: int) -> None:
        self.cdf = np.cumsum(length_probabilities(store.doc_lengths, bias))
        self.cdf[-1] = 1.0
        self.seed, self.stream = seed, stream
        self._block_index = -1
        self._docs = np.empty(0, dtype=np.int64)

    def doc(self, k: int) -> int:
        block, i = divmod(k, DRAW_BLOCK)
        if block != self._block_index:
            u = np.random.default_rng([self.seed, self.stream, block, 0x1E9]).random(DRAW_BLOCK)
            self._docs = np.searchsorted(self.cdf, u, side="right")
            self._block_index = block
        return int(min(self._docs[i], len(self.cdf) - 1))


class BiasedSequentialStream(Stream):
    """Drawn documents read in full, one after another, leftovers carried to the next sequence."""

    def __init__(self, store: TokenStore, seq_len: int, stream: int, n_streams: int, seed: int, bias: float) -> None:
        self.offsets = store.doc_offsets
        self.seq_len, self.stream, self.seed = seq_len, stream, seed
        self.draws = BiasedDraws(store, bias, seed, stream)
        self.k = 0
        """Index of the current draw."""
        self.head = 0
        """Tokens of the current draw already read."""

    def next_sequence(self) -> list[Segment]:
        segments: list[Segment] = []
        need = self.seq_len
        while need:
            doc = self.draws.doc(self.k)
            start, end = self.doc_span(doc)
            a = start + self.head
            take = min(end - a, need)
            segments.append((doc, self.k, a, a + take))
            need -= take
            self.head += take
            if a + take == end:
                self.k, self.head = self.k + 1, 0
        return segments

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "head": self.head}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k, self.head = int(state["k"]), int(state["head"])


class BiasedRsdbStream(RsdbStream):
    """RSDB whose buffer is refilled with drawn documents; `pos` counts the draws."""

    def __init__(
        self, store: TokenStore, seq_len: int, stream: int, n_streams: int, seed: int, buffer_size: int, bias: float
    ) -> None:
        super().__init__(store, seq_len, stream, n_streams, seed, buffer_size)
        self.biased = BiasedDraws(store, bias, seed, stream)

    def _refill(self) -> None:
        while len(self.buf_doc) < 2 * self.size:
            self.buf_doc.append(self.biased.doc(self.pos))
            self.buf_epoch.append(self.pos)
            self.buf_head.append(0)
            self.pos += 1


class LengthBiasedLoader(PackedLoader):
    """A rank's loader of length-biased draws: `rsdb` (buffer_size > 0) or `sequential` streams."""

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        micro_batch: int,
        bias: float,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        seed: int = 0,
        buffer_size: int = 0,
    ) -> None:
        self.bias, self.buffer_size = bias, buffer_size
        self.kind = "length_biased_rsdb" if buffer_size > 0 else "length_biased_sequential"
        super().__init__(store, seq_len, micro_batch, rank, world, workers, seed)

    def make_stream(self, stream: int, n_streams: int) -> Stream:
        if self.buffer_size > 0:
            per_worker = max(1, self.buffer_size // self.workers)
            return BiasedRsdbStream(self.store, self.seq_len, stream, n_streams, self.seed, per_worker, self.bias)
        return BiasedSequentialStream(self.store, self.seq_len, stream, n_streams, self.seed, self.bias)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bias": self.bias, "buffer_size": self.buffer_size}
