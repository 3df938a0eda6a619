"""Planning a prepare: which pieces of each source a phase needs, and which shard tokenizes each.

Per source, the pieces from where its stream stands (`trinity.data.positions`), pass after pass
(a finite source wraps to its held-out boundary), until their estimated tokens reach the quota plus
MARGIN. Estimates come from the tokenizer's own measurements on its sample (its `metrics.json`:
bytes, tokens and documents per source, else overall, else FALLBACK constants); a later round
re-estimates from the pieces already tokenized. The plan depends only on the sources, the starting
positions, the estimates and the piece size: every Slurm array task computes the same plan.

Dealing (`deal`): the pieces of all sources, in order (each range once), are cut into `shards`
contiguous runs of about equal estimated tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trinity.data.piece_store import PlannedPiece
from trinity.data.positions import Position, at, next_pass
from trinity.data.sources import Address, Piece, SourceReader
from trinity.errors import MixError

MARGIN = 0.10
FALLBACK_TOKENS_PER_BYTE = 0.3
FALLBACK_BYTES_PER_DOCUMENT = 2000.0


@dataclass(frozen=True)
class Rate:
    """Tokens a source yields: per byte of text, and bytes per document (the boundary token is extra)."""

    tokens_per_byte: float = FALLBACK_TOKENS_PER_BYTE
    bytes_per_document: float = FALLBACK_BYTES_PER_DOCUMENT

    @classmethod
    def measured(cls, text_bytes: float, tokens: float, documents: float) -> Rate | None:
        """From counts (tokens without boundary tokens); None when there is too little to tell."""
        if text_bytes <= 0 or tokens <= 0 or documents <= 0:
            return None
        return cls(tokens / text_bytes, text_bytes / documents)

    def tokens(self, piece: Piece, piece_bytes: int) -> int:
        """Expected tokens of a piece (boundary tokens included), from whatever the piece estimates."""
        if piece.est_bytes > 0:
            documents = piece.est_documents or piece.est_bytes / self.bytes_per_document
            return round(piece.est_bytes * self.tokens_per_byte + documents)
        if piece.est_documents > 0:
            return round(piece.est_documents * (self.bytes_per_document * self.tokens_per_byte + 1))
        return round(piece_bytes * self.tokens_per_byte)


def tokenizer_rates(tokenizer_path: Path | str, names: list[str]) -> dict[str, Rate]:
    """Each source's rate from the tokenizer node's metrics.json beside tokenizer.json (if any)."""
    p = Path(tokenizer_path)
    metrics_path = (p if p.is_dir() else p.parent) / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError):
        metrics = {}
    per_source = metrics.get("sources", {}) if isinstance(metrics, dict) else {}
    overall = [Rate.measured(s["bytes"], s["tokens"], s["documents"]) for s in per_source.values()]
    known = [r for r in overall if r is not None]
    default = (
        Rate(
            sum(r.tokens_per_byte for r in known) / len(known),
            sum(r.bytes_per_document for r in known) / len(known),
        )
        if known
        else Rate()
    )
    rates = {}
    for name in names:
        s = per_source.get(name)
        rate = Rate.measured(s["bytes"], s["tokens"], s["documents"]) if isinstance(s, dict) else None
        rates[name] = rate or default
    return rates


def stream_pieces(
    name: str, reader: SourceReader, start: Position, boundary: Address, piece_bytes: int
) -> Iterator[tuple[int, Piece]]:
    """(pass, piece) from `start` on, for ever: at the end of a pass, the next pass from `boundary`."""
    position = start
    while True:
        found = False
        for piece in reader.pieces(position.address, piece_bytes):
            found = True
            yield position.passes, piece
        if reader.end is None:
            return
        if not found and position.address == boundary:
            raise MixError(f"source {name!r} has no documents after its held-out ones")
        position = next_pass(name, reader, position, boundary)


def plan_source(
    name: str,
    reader: SourceReader,
    start: Position,
    boundary: Address,
    tokens: int,
    rate: Rate,
    piece_bytes: int,
) -> list[PlannedPiece]:
    """The pieces from `start` whose estimated tokens reach `tokens` x (1 + MARGIN) (none for 0 tokens)."""
    want = tokens * (1 + MARGIN)
    planned: list[PlannedPiece] = []
    total = 0
    if tokens <= 0:
        return planned
    for passes, piece in stream_pieces(name, reader, start, boundary, piece_bytes):
        est = max(1, rate.tokens(piece, piece_bytes))
        planned.append(PlannedPiece(name, passes, piece, est))
        total += est
        if total >= want:
            break
    return planned


def after(reader: SourceReader, planned: PlannedPiece, documents: int) -> Position:
    """Where the stream stands after a planned piece (the start of the next one)."""
    return at(reader, planned.passes, planned.piece.stop, documents)


def deal(pieces: list[PlannedPiece], shards: int) -> list[tuple[PlannedPiece, ...]]:
    """Pieces (each range once, in order) cut into `shards` contiguous runs of about equal estimated tokens."""
    unique: dict[str, PlannedPiece] = {}
    for p in pieces:
        unique.setdefault(p.name, p)
    ordered = list(unique.values())
    total = sum(p.est_tokens for p in ordered) or 1
    dealt: list[list[PlannedPiece]] = [[] for _ in range(shards)]
    before = 0
    for p in ordered:
        middle = before + p.est_tokens / 2
        dealt[min(shards - 1, int(middle * shards / total))].append(p)
        before += p.est_tokens
    return [tuple(d) for d in dealt]
