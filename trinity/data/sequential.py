"""The sequential packing baseline (PAPER.md 5): documents in order, leftovers carried to the next sequence.

Each worker stream walks its documents of the epoch in the epoch's (seeded) order and cuts the
concatenation into `seq_len` pieces: a document that does not fit continues at the start of the
stream's next sequence, and the last sequence of an epoch is completed with the next epoch's first
documents. A sequence thus holds a handful of consecutive documents, and a long document fills many
sequences in a row (what makes its micro-batches homogeneous, and BatchHet high). Shared contract
(sharding, epochs, targets, document ids, state): `trinity.data.packing`.
"""

from __future__ import annotations

from typing import Any

from trinity.data.packing import PackedLoader, Segment, Stream


class SequentialStream(Stream):
    """One worker: a read position (epoch, document, head) moving through its documents."""

    epoch = 0
    pos = 0
    """Index of the current document in the stream's documents of this epoch."""
    head = 0
    """Tokens of the current document already read."""

    def next_sequence(self) -> list[Segment]:
        segments: list[Segment] = []
        need = self.seq_len
        while need:
            docs = self.order.docs(self.epoch)
            if self.pos == len(docs):
                self.epoch, self.pos, self.head = self.epoch + 1, 0, 0
                continue
            doc = int(docs[self.pos])
            start, end = self.doc_span(doc)
            a = start + self.head
            take = min(end - a, need)
            segments.append((doc, self.epoch, a, a + take))
            need -= take
            self.head += take
            if a + take == end:
                self.pos, self.head = self.pos + 1, 0
        return segments

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "head": self.head}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos, self.head = int(state["epoch"]), int(state["pos"]), int(state["head"])


class SequentialLoader(PackedLoader):
    """Sequential packing for one data-parallel rank."""

    kind = "sequential"

    def make_stream(self, stream: int, n_streams: int) -> Stream:
        return SequentialStream(self.store, self.seq_len, stream, n_streams, self.seed)
