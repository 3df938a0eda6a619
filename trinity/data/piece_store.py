"""Pieces: a source's documents in one address range, tokenized and committed as their own store.

A prepare cuts what a phase reads of each source into pieces (`trinity.data.sources.Piece`: the
documents whose address is in [start, stop) of one pass), deals them to shards, and each shard's
worker tokenizes its pieces in order. Each piece becomes a format-1 token store (`trinity.data.store`)
at `<out_dir>/pieces/<source>/<start>-<stop>`, holding every document of the range (the phase's quota
is cut later, when the pieces are merged) and, per document, `doc_address`: the address after it, so
a phase that stops inside a piece knows exactly where the next phase continues.

The name depends only on the source and the range, never on the shard count, the workers or the pass
(the same range read in two passes has the same tokens, so a small source that wraps is tokenized
once). A piece is written to a temp directory and committed by rename + marker like any store; a
committed piece is never redone, so a killed prepare resumes at piece granularity, and concurrent
shards (a Slurm job array) never write the same piece.

Speed: texts are encoded in batches of about BATCH_BYTES by the tokenizer's Rust core
(`encode_batch_fast`: the same ids without the character offsets), and each batch becomes one flat
numpy array at once; documents are never converted one by one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from trinity.data.sources import Address, Piece, SourceReader
from trinity.data.store import StoreWriter, ZarrStore, clear_stale, commit_dir, is_committed, open_piece, temp_dir_for
from trinity.data.tokenizer import Tokenizer, load_tokenizer
from trinity.spec.data import Source

PIECES = "pieces"
BATCH_BYTES = 1 << 20


def piece_name(source: str, piece: Piece) -> str:
    """`<source>/<file>-<offset>-<file>-<offset>`: the piece's folder under `<out_dir>/pieces`."""
    a, b = piece.start, piece.stop
    return f"{source}/{a.file:06d}-{a.offset:012d}-{b.file:06d}-{b.offset:012d}"


def piece_path(out_dir: Path | str, source: str, piece: Piece) -> Path:
    return Path(out_dir) / PIECES / piece_name(source, piece)


@dataclass(frozen=True)
class PlannedPiece:
    """A piece of one source read in one pass, and how many tokens it is expected to hold."""

    source: str
    passes: int
    piece: Piece
    est_tokens: int

    @property
    def name(self) -> str:
        return piece_name(self.source, self.piece)


def encode_documents(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths) of texts, each followed by the boundary token, as two flat arrays."""
    ids = [e.ids for e in tok.hf.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    doc = [tok.doc_id]
    tokens = np.fromiter(chain.from_iterable(chain(x, doc) for x in ids), dtype=np.uint32, count=int(lengths.sum()))
    return tokens, lengths


def batches(reader: SourceReader, piece: Piece) -> Iterator[tuple[list[str], list[Address], int]]:
    """The piece's documents in batches of about BATCH_BYTES: (texts, address after each, bytes)."""
    texts: list[str] = []
    after: list[Address] = []
    size = 0
    for text, address in reader.read(piece):
        texts.append(text)
        after.append(address)
        size += len(text.encode("utf-8"))
        if size >= BATCH_BYTES:
            yield texts, after, size
            texts, after, size = [], [], 0
    if texts:
        yield texts, after, size


def tokenize_piece(reader: SourceReader, tok: Tokenizer, out_dir: Path | str, planned: PlannedPiece) -> Path:
    """Tokenize one piece into its own committed store (stale temp directories of it removed first)."""
    final = piece_path(out_dir, planned.source, planned.piece)
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(final)
    tmp = temp_dir_for(final)
    p = planned.piece
    writer = StoreWriter(
        tmp,
        [planned.source],
        {
            "split": PIECES,
            "tokenizer_sha256": tok.sha256,
            "doc_token": tok.doc_id,
            "start": [p.start.file, p.start.offset],
            "stop": [p.stop.file, p.stop.offset],
        },
    )
    addresses: list[Address] = []
    text_bytes = 0
    for texts, after, size in batches(reader, p):
        tokens, lengths = encode_documents(tok, texts)
        writer.add_many(planned.source, tokens, lengths)
        addresses.extend(after)
        text_bytes += size
    writer.add_array("doc_address", np.asarray([(a.file, a.offset) for a in addresses], dtype=np.int64).reshape(-1, 2))
    writer.close({"text_bytes": text_bytes})
    commit_dir(tmp, final)
    return final


def open_planned(out_dir: Path | str, planned: PlannedPiece) -> ZarrStore:
    return open_piece(piece_path(out_dir, planned.source, planned.piece))


@dataclass(frozen=True)
class ShardJob:
    """What one worker (a process, or a Slurm array task) tokenizes: one shard's pieces, in order."""

    index: int
    pieces: tuple[PlannedPiece, ...]
    sources: dict[str, Source]
    base_dir: str
    tokenizer_path: str
    out_dir: str


@dataclass(frozen=True)
class ShardResult:
    index: int
    tokenized: tuple[str, ...]
    """Pieces this run committed."""
    kept: tuple[str, ...]
    """Pieces found committed already (by an earlier, killed run or another task), left as they were."""


def run_shard(job: ShardJob) -> ShardResult:
    """Tokenize a shard's pieces that are not committed yet (idempotent; safe to rerun after a kill)."""
    todo = [p for p in job.pieces if not is_committed(piece_path(job.out_dir, p.source, p.piece))]
    kept = tuple(p.name for p in job.pieces if p not in todo)
    if todo:
        tok = load_tokenizer(job.tokenizer_path)
        readers: dict[str, SourceReader] = {}
        for planned in todo:
            if planned.source not in readers:
                readers[planned.source] = SourceReader(job.sources[planned.source], job.base_dir)
            tokenize_piece(readers[planned.source], tok, job.out_dir, planned)
    return ShardResult(job.index, tuple(p.name for p in todo), kept)


def limit_threads(threads: int) -> None:
    """A worker process's share of the cores for the tokenizer's Rust threads (read when its pool starts)."""
    os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
