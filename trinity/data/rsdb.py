"""The Random Sequential Document Buffer (RSDB), exactly as PAPER.md 5 describes it.

Per worker stream, with B = max(1, buffer_size // workers) (the configured size is per rank, split
over its loader workers):
- the buffer holds whole tokenized documents, each with a read head (tokens already read);
- to fill one sequence: pick a buffered document uniformly at random, copy from its read head as many
  tokens as fit (all it has left, or what the sequence still needs), advance the head; if the sequence
  is not full, pick another random document, and so on;
- a document whose head reaches its end leaves the buffer;
- the internal buffer holds 2B documents; before each pick, if occupancy has dropped to B (or below),
  it is refilled in bulk to 2B with the stream's next documents (epoch order as in
  `trinity.data.packing`; the tail of an epoch is refilled from the next epoch).

A sequence thus mixes pieces of many unrelated documents, and a long document is spread over many
micro-batches: the source of RSDB's lower BatchHet. Each document is still read in order, and every
token of an epoch is yielded exactly once.

Randomness is counter-based: the k-th pick of stream s uses the k-th uniform of blocks drawn from
`default_rng([seed, s, block])`, so the state is just the pick counter (plus epoch, queue position and
the buffer's (document, epoch, head) triples): plain ints and lists, exact on resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trinity.data.packing import PackedLoader, Segment, Stream
from trinity.data.store import TokenStore

DRAW_BLOCK = 4096


class RsdbStream(Stream):
    """One worker: its buffer of documents with read heads, refilled from its epoch order."""

    def __init__(
        self, store: TokenStore, seq_len: int, stream: int, n_streams: int, seed: int, buffer_size: int
    ) -> None:
        super().__init__(store, seq_len, stream, n_streams, seed)
        self.size = buffer_size
        self.epoch = 0
        self.pos = 0
        """Next document of the epoch order to enter the buffer."""
        self.draws = 0
        """Random picks made so far."""
        self.buf_doc: list[int] = []
        self.buf_epoch: list[int] = []
        self.buf_head: list[int] = []
        self._block_index = -1
        self._block = np.empty(0)

    def _uniform(self) -> float:
        block, i = divmod(self.draws, DRAW_BLOCK)
        if block != self._block_index:
            self._block = np.random.default_rng([self.seed, self.stream, block, 0x25DB]).random(DRAW_BLOCK)
            self._block_index = block
        self.draws += 1
        return float(self._block[i])

    def _refill(self) -> None:
        while len(self.buf_doc) < 2 * self.size:
            docs = self.order.docs(self.epoch)
            if self.pos == len(docs):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            self.buf_doc.append(int(docs[self.pos]))
            self.buf_epoch.append(self.epoch)
            self.buf_head.append(0)
            self.pos += 1

    def _remove(self, i: int) -> None:
        """Swap the exhausted document with the last one and drop it (O(1), deterministic)."""
        for lst in (self.buf_doc, self.buf_epoch, self.buf_head):
            lst[i] = lst[-1]
            lst.pop()

    def next_sequence(self) -> list[Segment]:
        segments: list[Segment] = []
        need = self.seq_len
        while need:
            if len(self.buf_doc) <= self.size:
                self._refill()
            i = min(int(self._uniform() * len(self.buf_doc)), len(self.buf_doc) - 1)
            doc = self.buf_doc[i]
            start, end = self.doc_span(doc)
            a = start + self.buf_head[i]
            take = min(end - a, need)
            segments.append((doc, self.buf_epoch[i], a, a + take))
            need -= take
            if a + take == end:
                self._remove(i)
            else:
                self.buf_head[i] += take
        return segments

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "draws": self.draws,
            "buf_doc": list(self.buf_doc),
            "buf_epoch": list(self.buf_epoch),
            "buf_head": list(self.buf_head),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos, self.draws = int(state["epoch"]), int(state["pos"]), int(state["draws"])
        self.buf_doc = [int(x) for x in state["buf_doc"]]
        self.buf_epoch = [int(x) for x in state["buf_epoch"]]
        self.buf_head = [int(x) for x in state["buf_head"]]


class RsdbLoader(PackedLoader):
    """RSDB for one data-parallel rank: `workers` streams, each with buffer_size // workers documents."""

    kind = "rsdb"

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        seed: int = 0,
        buffer_size: int = 4096,
    ) -> None:
        self.buffer_size = buffer_size
        super().__init__(store, seq_len, micro_batch, rank, world, workers, seed)

    def make_stream(self, stream: int, n_streams: int) -> Stream:
        per_worker = max(1, self.buffer_size // self.workers)
        return RsdbStream(self.store, self.seq_len, stream, n_streams, self.seed, per_worker)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "buffer_size": self.buffer_size}
