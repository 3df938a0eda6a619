"""What both loaders share: the batch they yield, how a store is split, how sequences become tensors.

Contract of every loader (`SequentialLoader`, `RsdbLoader`; built by `loaders.build_loader`):

- A loader serves "rank" `rank` of `world`: in training, data stream s of S = data.streams
  (`trinity.distributed.data.StreamSet` builds each data-parallel rank's own streams). It runs
  `workers` independent sub-streams ("loader workers"); the sequences of a micro-batch come from
  them round-robin (sequence k from worker k mod workers). Stream `rank * workers + w` of
  `world * workers` streams.
- Epochs: epoch e orders the store's documents by a permutation drawn from `(seed, e)`; stream s owns
  the documents at positions s, s + S, s + 2S, ... of it (S = world x workers). So within an epoch
  every document belongs to exactly one stream: nothing lost, nothing read twice. A stream that
  finishes its share goes on with its share of epoch e + 1; there is no end.
- Sequences are always full: `seq_len` tokens of real documents, never padding. A document that does
  not fit continues in the stream's next sequence (sequential) or stays buffered with its read head
  advanced (RSDB); the tail of one epoch is completed with documents of the next. One epoch thus
  yields each stored token exactly once as an input token.
- `doc_ids_BT` = epoch x n_docs + document index: unique per (document, epoch), so a document met
  again in the next epoch is a different document for intra-document masking, and
  `doc_ids % n_docs` indexes the store (`doc_source`, `doc_offsets`).
- `targets_BT[b, t]` = the next token of the same document, read from the store even when it lies in
  the next sequence; -100 at each document's last token (its `<|doc|>` boundary), whose successor
  belongs to another document. Targets therefore never cross documents; whether attention does is
  the training loop's choice, driven by `doc_ids_BT`.
- `state_dict()` is plain ints and lists of ints (JSON- and Zarr-friendly); `load_state_dict` restores
  the exact remaining stream. It also records the configuration and refuses a mismatched one
  (the micro-batch size may change: the stream is defined per sequence).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trinity.data.store import TokenStore

IGNORE = -100

Segment = tuple[int, int, int, int]
"""(document index, epoch, start, end): store positions [start, end) of one document in one epoch."""


@dataclass(frozen=True)
class Batch:
    """One micro-batch: B sequences of T tokens, their next-token targets and their document ids."""

    tokens_BT: torch.Tensor
    targets_BT: torch.Tensor
    doc_ids_BT: torch.Tensor


class EpochOrder:
    """The documents a stream owns in each epoch (cached for the current epoch)."""

    def __init__(self, n_docs: int, stream: int, n_streams: int, seed: int) -> None:
        if n_docs < n_streams:
            raise ValueError(
                f"the store has {n_docs} documents, fewer than the {n_streams} loader streams "
                "(data.streams x workers); use fewer workers or streams, or a larger phase"
            )
        self.n_docs, self.stream, self.n_streams, self.seed = n_docs, stream, n_streams, seed
        self._epoch = -1
        self._docs = np.empty(0, dtype=np.int64)

    def docs(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            perm = np.random.default_rng([self.seed, epoch, 0xD0C]).permutation(self.n_docs)
            self._docs, self._epoch = perm[self.stream :: self.n_streams], epoch
        return self._docs


class Stream:
    """One worker's endless sequence of sequences; subclasses define `next_sequence`."""

    def __init__(self, store: TokenStore, seq_len: int, stream: int, n_streams: int, seed: int) -> None:
        self.offsets = store.doc_offsets
        self.seq_len = seq_len
        self.order = EpochOrder(store.n_docs, stream, n_streams, seed)
        self.stream, self.seed = stream, seed

    def doc_span(self, doc: int) -> tuple[int, int]:
        return int(self.offsets[doc]), int(self.offsets[doc + 1])

    def next_sequence(self) -> list[Segment]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class PackedLoader:
    """A rank's loader: worker streams interleaved round-robin into micro-batches."""

    kind = "packed"

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        seed: int = 0,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}")
        self.store, self.seq_len, self.micro_batch = store, seq_len, micro_batch
        self.rank, self.world, self.workers, self.seed = rank, world, workers, seed
        self.tokens = store.tokens
        self.n_docs = store.n_docs
        n_streams = world * workers
        self.streams = [self.make_stream(rank * workers + w, n_streams) for w in range(workers)]
        self.turn = 0

    def make_stream(self, stream: int, n_streams: int) -> Stream:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world": self.world,
            "workers": self.workers,
            "seed": self.seed,
            "n_docs": self.n_docs,
            "n_tokens": self.store.n_tokens,
        }

    def next_sequences(self) -> list[list[Segment]]:
        """The segments of the next micro-batch's sequences (without building tensors)."""
        out = []
        for _ in range(self.micro_batch):
            out.append(self.streams[self.turn].next_sequence())
            self.turn = (self.turn + 1) % self.workers
        return out

    def next_batch(self) -> Batch:
        seqs = self.next_sequences()
        tokens = np.empty((len(seqs), self.seq_len), dtype=np.int64)
        targets = np.empty_like(tokens)
        doc_ids = np.empty_like(tokens)
        for b, segments in enumerate(seqs):
            self._fill(segments, tokens[b], targets[b], doc_ids[b])
        return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(doc_ids))

    def _fill(self, segments: list[Segment], tok: np.ndarray, tgt: np.ndarray, ids: np.ndarray) -> None:
        t = 0
        toks, offsets = self.tokens, self.store.doc_offsets
        for doc, epoch, a, b in segments:
            n = b - a
            tok[t : t + n] = toks[a:b]
            tgt[t : t + n - 1] = toks[a + 1 : b]
            tgt[t + n - 1] = IGNORE if b == offsets[doc + 1] else toks[b]
            ids[t : t + n] = epoch * self.n_docs + doc
            t += n
        assert t == self.seq_len, f"sequence of {t} tokens, expected {self.seq_len}"

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {**self.config(), "turn": self.turn, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.config()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"loader state does not match this loader ({detail})")
        self.turn = int(state["turn"])
        for s, st in zip(self.streams, state["streams"], strict=True):
            s.load_state_dict(st)
