"""The prepare node of a data phase: tokenize the phase's mix into committed token stores, sharded and resumable.

`prepare_phase(mix, sources, tokenizer_path, base_dir, out_dir, ...)` writes, under `out_dir`:
- `heldout`: the first `holdout_documents` documents of each source (the same in every phase), an
  ordinary store (`trinity.data.store`, format 1);
- `pieces/<source>/<range>`: the tokenized pieces of the sources (`trinity.data.piece_store`);
- `train`: the documents the loaders draw from, a manifest store (format 2) of document ranges of the
  pieces, in mix order, source by source, each source's documents in stream order.

Which documents: `trinity.data.mix.quotas` per source; each source's documents are taken in stream
order from where the previous phases stopped (`previous`, read with `end_positions` from the
previous phase's store; the first phase starts right after the held-out documents), whole, until
the quota (the last one may overshoot by less than one document). A finite source that runs out
goes on with its next pass from the held-out boundary (`source_passes`, `wrapped` in the metrics).
The train store records `source_start` and `source_positions` (where the next phase continues).

How: every source is checked (`SourceReader.check`) before anything is committed. Round 1 plans
the pieces each source needs by estimate (`trinity.data.plan`), deals them to `shards` shards, and
`workers` processes tokenize the shards (workers=1: this process); each piece commits on its own, and
a committed piece is never redone, so a killed prepare resumes where it stopped. The merge walks each
source's pieces; if the estimate fell short, further rounds plan and tokenize more. Only then are
`heldout` and `train` written and committed (temp directory, rename, marker last). None of shards,
workers or the piece size changes the tokens, offsets, sources or attributes of the stores.

On Slurm, `prepare_shard(..., shard)` runs round 1 of one shard (a job array task); the node's own job
then runs `prepare_phase`, which finds those pieces committed and does the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trinity.data.mix import quotas
from trinity.data.piece_store import (
    PlannedPiece,
    ShardJob,
    ShardResult,
    encode_documents,
    limit_threads,
    open_planned,
    run_shard,
)
from trinity.data.plan import Rate, deal, plan_source, tokenizer_rates
from trinity.data.positions import Position, at, first_position, resume
from trinity.data.sources import Address, SourceReader
from trinity.data.store import StoreWriter, clear_stale, commit_dir, temp_dir_for, write_manifest
from trinity.data.tokenizer import Tokenizer, load_tokenizer
from trinity.errors import MixError
from trinity.spec.data import MixSpec, Source

TRAIN = "train"
HELDOUT = "heldout"
PIECE_BYTES = 256 * 10**6
MAX_ROUNDS = 100


def store_paths(out_dir: Path | str) -> tuple[Path, Path]:
    """The (train, heldout) store directories of a prepare node's output."""
    return Path(out_dir) / TRAIN, Path(out_dir) / HELDOUT


@dataclass
class _Source:
    """One source of the mix as the prepare sees it: its reader, held-out documents, start and quota."""

    name: str
    reader: SourceReader
    heldout: list[str]
    boundary: Address
    start: Position
    quota: int
    rate: Rate


def _heldout(name: str, reader: SourceReader, holdout: int, piece_bytes: int) -> tuple[list[str], Address]:
    """The first `holdout` documents of the source's first pass, and the address after them."""
    texts: list[str] = []
    boundary = Address(0, 0)
    if holdout > 0:
        for piece in reader.pieces(Address(0, 0), piece_bytes):
            for text, after in reader.read(piece):
                texts.append(text)
                boundary = after
                if len(texts) == holdout:
                    break
            if len(texts) == holdout:
                break
    if len(texts) < holdout or (reader.end is not None and boundary >= reader.end):
        raise MixError(
            f"source {name!r} has {len(texts)} documents, none left after holding out {holdout}; "
            "lower data.holdout_documents or add documents"
        )
    return texts, boundary


def _setup(
    mix: MixSpec,
    sources: dict[str, Source],
    tokenizer_path: Path | str,
    base_dir: Path | str,
    holdout_documents: int,
    previous: dict[str, Position] | None,
    piece_bytes: int,
) -> list[_Source]:
    """Check every source of the mix, read its held-out documents and find where this phase starts it."""
    names = list(mix.mix)
    readers = {name: SourceReader(sources[name], base_dir) for name in names}
    for reader in readers.values():
        reader.check()
    quota = quotas(mix.tokens, mix.mix)
    rates = tokenizer_rates(tokenizer_path, names)
    out = []
    for name in names:
        reader = readers[name]
        heldout, boundary = _heldout(name, reader, holdout_documents, piece_bytes)
        before = (previous or {}).get(name)
        start = first_position(reader, boundary) if before is None else resume(name, reader, before)
        out.append(_Source(name, reader, heldout, boundary, start, quota[name], rates[name]))
    return out


def _round_one(setup: list[_Source], piece_bytes: int) -> dict[str, list[PlannedPiece]]:
    return {s.name: plan_source(s.name, s.reader, s.start, s.boundary, s.quota, s.rate, piece_bytes) for s in setup}


def _jobs(
    plans: list[PlannedPiece], shards: int, sources: dict[str, Source], base_dir: Path | str, tok: Path, out: Path
) -> list[ShardJob]:
    return [
        ShardJob(i, pieces, sources, str(base_dir), str(tok), str(out))
        for i, pieces in enumerate(deal(plans, shards))
        if pieces
    ]


def _run_jobs(jobs: list[ShardJob], workers: int, done: Callable[[ShardResult], None]) -> None:
    """Run shard jobs on `workers` processes (1: here); the first failure stops the rest and is raised."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            done(run_shard(job))
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: the tokenizers library turns its threads off in a forked child.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=limit_threads, initargs=(threads,)) as pool:
        pending: set[Future[ShardResult]] = {pool.submit(run_shard, job) for job in jobs}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()  # type: ignore[misc]
                done(f.result())


def prepare_shard(
    mix: MixSpec,
    sources: dict[str, Source],
    tokenizer_path: Path | str,
    base_dir: Path | str,
    out_dir: Path | str,
    shard: int,
    holdout_documents: int = 0,
    previous: dict[str, Position] | None = None,
    shards: int = 1,
    piece_bytes: int = PIECE_BYTES,
) -> dict[str, Any]:
    """Tokenize round 1's pieces of one shard (a Slurm array task); idempotent. Returns its counts."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    setup = _setup(mix, sources, tokenizer_path, base_dir, holdout_documents, previous, piece_bytes)
    plans = [p for s in setup for p in _round_one(setup, piece_bytes)[s.name]]
    pieces = deal(plans, shards)[shard]
    result = run_shard(ShardJob(shard, pieces, sources, str(base_dir), str(tokenizer_path), str(out_dir)))
    return {"shard": shard, "pieces": len(pieces), "tokenized": len(result.tokenized), "kept": len(result.kept)}


def prepare_phase(
    mix: MixSpec,
    sources: dict[str, Source],
    tokenizer_path: Path | str,
    base_dir: Path | str,
    out_dir: Path | str,
    seed: int = 0,
    holdout_documents: int = 0,
    previous: dict[str, Position] | None = None,
    shards: int = 1,
    workers: int = 1,
    piece_bytes: int = PIECE_BYTES,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tokenize the phase's mix into `out_dir/{train,heldout}` (and its pieces), commit, return metrics.

    The stores depend on the mix, the sources, the tokenizer, `holdout_documents` and `previous`,
    not on `shards`, `workers` or `piece_bytes`, nor on `seed` (accepted for the node contract; the
    loaders, not the store, decide the training order). `progress` shows a bar (default: when stderr
    is a terminal).
    """
    del seed
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN, HELDOUT):
        clear_stale(out / name)
    tok = load_tokenizer(tokenizer_path)
    setup = _setup(mix, sources, tokenizer_path, base_dir, holdout_documents, previous, piece_bytes)
    plans = _round_one(setup, piece_bytes)
    tokenized: list[str] = []
    kept: list[str] = []
    show = sys.stderr.isatty() if progress is None else progress
    with Progress(
        TextColumn("prepare {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show,
        transient=True,
    ) as bar:
        task = bar.add_task("tokens (estimated)", total=sum(p.est_tokens for ps in plans.values() for p in ps))
        estimate = {p.name: p.est_tokens for ps in plans.values() for p in ps}
        handled: set[str] = set()

        def done(result: ShardResult) -> None:
            tokenized.extend(result.tokenized)
            kept.extend(result.kept)
            bar.advance(task, sum(estimate.get(n, 0) for n in (*result.tokenized, *result.kept)))

        def tokenize(new: list[PlannedPiece]) -> None:
            todo = [p for p in new if p.name not in handled]  # a later round may plan a range again
            handled.update(p.name for p in todo)
            more = sum(p.est_tokens for p in todo if p.name not in estimate)
            bar.update(task, total=(bar.tasks[0].total or 0) + more)
            estimate.update({p.name: p.est_tokens for p in todo})
            _run_jobs(_jobs(todo, shards, sources, base_dir, tok.path, out), workers, done)

        tokenize([p for ps in plans.values() for p in ps])
        merged, rounds = _merge(setup, plans, out, piece_bytes, tokenize)
    heldout_attrs = _write_heldout(setup, tok, out)
    train_attrs = _write_train(setup, merged, tok, out, previous)
    seconds = time.perf_counter() - t0
    n_tokens = sum(train_attrs["source_tokens"].values())
    return {
        "tokens": n_tokens,
        "documents": sum(train_attrs["source_documents"].values()),
        "heldout_tokens": sum(heldout_attrs["source_tokens"].values()),
        "heldout_documents": sum(heldout_attrs["source_documents"].values()),
        "seconds": seconds,
        "tokens_per_s": n_tokens / max(seconds, 1e-9),
        "shards": shards,
        "workers": workers,
        "piece_bytes": piece_bytes,
        "pieces": {"tokenized": len(tokenized), "kept": len(kept), "referenced": len(merged.refs)},
        "rounds": rounds,
        "sources": {
            s.name: {
                "quota": s.quota,
                "tokens": train_attrs["source_tokens"][s.name],
                "documents": train_attrs["source_documents"][s.name],
                "heldout_documents": heldout_attrs["source_documents"][s.name],
                "start": s.start.to_json(),
                "end": merged.end[s.name].to_json(),
                "passes": merged.last_pass[s.name],
                "wrapped": merged.last_pass[s.name] - s.start.passes,
            }
            for s in setup
        },
        "train_store": str(out / TRAIN),
        "heldout_store": str(out / HELDOUT),
    }


@dataclass
class _Merged:
    """The train store's document ranges, in order, and per source what was taken and where it ended."""

    refs: list[tuple[str, int, int]]
    tokens: dict[str, int]
    taken: dict[str, int]
    last_pass: dict[str, int]
    end: dict[str, Position]


def _merge(
    setup: list[_Source],
    plans: dict[str, list[PlannedPiece]],
    out: Path,
    piece_bytes: int,
    tokenize: Callable[[list[PlannedPiece]], None],
) -> tuple[_Merged, int]:
    """Take each source's documents from its pieces in order until its quota; plan more if they run short."""
    merged = _Merged([], {}, {}, {}, {})
    rounds = 1
    for s in setup:
        tokens = documents = 0
        text_bytes = raw_tokens = 0
        position = s.start
        last_pass = s.start.passes
        queue = list(plans[s.name])
        while tokens < s.quota:
            if not queue:
                rounds += 1
                if rounds > MAX_ROUNDS:
                    raise MixError(f"source {s.name!r}: {MAX_ROUNDS} rounds of pieces did not fill its quota")
                rate = Rate.measured(text_bytes, raw_tokens - documents, documents) or s.rate
                queue = plan_source(
                    s.name, s.reader, position, s.boundary,
                    s.quota - tokens, rate, piece_bytes,
                )  # fmt: skip
                tokenize(queue)
            planned = queue.pop(0)
            piece = open_planned(out, planned)
            lengths = piece.doc_lengths
            before = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])[:-1]  # tokens before each
            k = int(np.searchsorted(before, s.quota - tokens, side="left"))
            text_bytes += int(piece.attrs.get("text_bytes", 0))
            raw_tokens += piece.n_tokens
            if k:
                merged.refs.append((f"pieces/{planned.name}", 0, k))
                tokens += int(lengths[:k].sum())
                documents += k
                last_pass = planned.passes
            if k:  # the address after the last document taken: the same whatever the pieces' cut
                file, offset = (int(v) for v in piece.array("doc_address")[k - 1])
                position = at(s.reader, planned.passes, Address(file, offset), s.start.documents + documents)
            else:
                position = at(s.reader, planned.passes, planned.piece.stop, s.start.documents + documents)
        merged.tokens[s.name] = tokens
        merged.taken[s.name] = documents
        merged.last_pass[s.name] = last_pass
        merged.end[s.name] = position
    return merged, rounds


def _attrs(tok: Tokenizer, split: str) -> dict[str, Any]:
    return {
        "split": split,
        "tokenizer_sha256": tok.sha256,
        "doc_token": tok.doc_id,
        "pad_token": tok.pad_id,
        "vocab_size": tok.vocab_size,
    }


def _write_heldout(setup: list[_Source], tok: Tokenizer, out: Path) -> dict[str, Any]:
    final = out / HELDOUT
    tmp = temp_dir_for(final)
    writer = StoreWriter(tmp, [s.name for s in setup], _attrs(tok, HELDOUT))
    for s in setup:
        if s.heldout:
            writer.add_many(s.name, *encode_documents(tok, s.heldout))
    attrs = writer.close()
    commit_dir(tmp, final)
    return attrs


def _write_train(
    setup: list[_Source], merged: _Merged, tok: Tokenizer, out: Path, previous: dict[str, Position] | None
) -> dict[str, Any]:
    names = [s.name for s in setup]
    positions = {name: p.to_json() for name, p in (previous or {}).items()}
    positions.update({name: merged.end[name].to_json() for name in names})
    attrs = {
        **_attrs(tok, TRAIN),
        "sources": names,
        "quotas": {s.name: s.quota for s in setup},
        "source_tokens": merged.tokens,
        "source_documents": merged.taken,
        "source_passes": merged.last_pass,
        "source_start": {s.name: s.start.to_json() for s in setup},
        "source_positions": positions,
    }
    final = out / TRAIN
    tmp = temp_dir_for(final)
    write_manifest(tmp, attrs, merged.refs)
    commit_dir(tmp, final)
    return attrs
