"""One checkpoint written by every rank of a torch.distributed job, committed once.

`save_checkpoint` calls `save_collective` when torch.distributed runs more than one rank. Every
rank passes its own state tree: the same structure everywhere; DTensor leaves (FSDP2/HSDP and
expert-parallel parameters and optimizer states) hold each rank's piece; every other leaf is the
same on all ranks. The result is the same Zarr checkpoint a single process writes (see
trinity.store.checkpoint): a DTensor leaf is ONE array of its global shape and dtype, so a
single-process load, `trinity generate` and the Hugging Face export read it like any tensor.

Phases, each closed by a status exchange (all_gather_object of "ok" or the error) that every rank
reaches, so a failure on any rank is known to all, nobody waits forever and all of them raise:

1. every rank flattens its tree, works out each DTensor's layout, its own piece and the chunk
   grid (the largest piece: each piece is exactly one chunk, see trinity.store.shards);
   the ranks compare a digest of their leaves (paths, shapes, dtypes, layouts), and rank 0's
   temporary folder name (.tmp-step-N-<rank 0's pid>) reaches everyone;
2. small DTensors (global size under `pack_below_bytes`) are gathered (full_tensor, in leaf
   order on every rank) and rank 0 packs them with the other small leaves; rank 0 creates the
   group, writes every non-DTensor array and %packed, and creates each DTensor's array
   (metadata only);
3. each rank writes the pieces it owns, each into its own chunk, fsyncs those files and hashes
   them (size and sha256, trinity.store.checkpoint_integrity); the hashes reach rank 0 in the
   exchange: for a DTensor, the rank at index 0 on every Replicate() mesh dim writes its piece;
   replicas do not;
4. rank 0 writes the skeleton attribute (with the layout the checkpoint was written with),
   fsyncs the rest, hashes every file but the other ranks' chunks, renames, writes COMMITTED
   (with every file's checksum) and prunes.

On any failure rank 0 removes the temporary folder: no step folder, no committed checkpoint.
A rank that dies (killed, not raising) leaves the others waiting in the next exchange until the
process group's timeout, as any collective would.

Asynchronous saves (trinity.store.checkpoint_async) split this in two. At the step boundary, on the
training thread, `snapshot_collective` does phase 1's planning and phase 2's gathers (the only
collectives on the training's process group) and copies every leaf and this rank's pieces to host
memory; later a worker thread calls `save_collective(..., snapshot=, group=)`, whose exchanges run on
`group`, a gloo group of all ranks created once for the purpose, so that they never interleave with
the training's collectives on the default group.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import zarr
from torch.distributed.tensor import DTensor
from zarr import AsyncArray
from zarr.core.sync import sync
from zarr.storage import LocalStore

from trinity.errors import CollectiveSaveError
from trinity.run.layout import fsync_path
from trinity.store import shards
from trinity.store.checkpoint_commit import (
    checkpoint_name,
    claimed,
    commit,
    marker_summary,
    prune_checkpoints,
    temporary_name,
)
from trinity.store.checkpoint_encoding import PACK_BELOW_BYTES, StoredLeaves, stored_array, stored_dtype, tensor_record
from trinity.store.checkpoint_integrity import FileDigest, digest_files, manifest
from trinity.store.checkpoint_zarr import (
    FORMAT,
    Compression,
    compressors_for,
    create_group,
    open_group,
    raw_array,
    set_attrs,
    write_arrays,
    write_chunk,
    write_groups,
    write_metadata,
)
from trinity.store.tree import Leaf, flatten

_CONCURRENT_PIECES = 16


def _exchange(
    what: str, error: BaseException | None, value: Any = None, group: dist.ProcessGroup | None = None
) -> list[Any]:
    """Every rank's `value`, once every rank got here; if any rank failed, raise on all of them
    (a rank re-raises its own error, the others a CollectiveSaveError naming the first that failed).
    The exchange runs on `group` (None: the default group), whose ranks must be all the job's ranks."""
    mine = (None if error is None else f"{type(error).__name__}: {error}", value)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    failed = [(rank, err) for rank, (err, _) in enumerate(everyone) if err is not None]
    if error is not None:
        raise error
    if failed:
        rank, err = failed[0]
        raise CollectiveSaveError(f"{what}: rank {rank} failed ({err}); no checkpoint was committed")
    return [v for _, v in everyone]


class _Piece(Protocol):
    """What the writers read of a DTensor leaf: a DTensor, or its host copy (`_HostPiece`)."""

    @property
    def dtype(self) -> torch.dtype: ...

    def numel(self) -> int: ...

    def to_local(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class _HostPiece:
    """A DTensor leaf's local piece copied to host memory, standing in for the DTensor when a snapshot
    is written from another thread (which must not touch the live DTensor, nor run its collectives)."""

    local: torch.Tensor
    dtype: torch.dtype
    global_numel: int

    def numel(self) -> int:
        return self.global_numel

    def to_local(self) -> torch.Tensor:
        return self.local


@dataclass(frozen=True)
class _Sharded:
    """A DTensor leaf: its layout, and either `packed` (small: gathered to rank 0) or its chunk grid and this
    rank's piece."""

    dt: _Piece
    layout: shards.Layout
    packed: bool
    chunks: tuple[int, ...] | None
    piece: shards.LocalPiece | None


@dataclass(frozen=True)
class _Plan:
    skeleton: Any
    leaves: list[Leaf]
    sharded: dict[int, _Sharded]
    digest: str


HostCopy = Callable[[str, torch.Tensor], torch.Tensor]
"""Copies a tensor (named by its leaf path) to host memory: see trinity.store.checkpoint_async."""


@dataclass(frozen=True)
class HostSnapshot:
    """One rank's state as `save_collective` writes it, all in host memory: the plan, every leaf and this
    rank's pieces copied, the small DTensors already gathered. Writing it runs no collective but the
    exchanges (on the group given to save_collective)."""

    plan: _Plan
    gathered: dict[int, torch.Tensor]


def snapshot_collective(state: Any, copy: HostCopy, pack_below_bytes: int = PACK_BELOW_BYTES) -> HostSnapshot:
    """Phase 1's plan and phase 2's gathers of `state`, on every rank (a collective on the default group:
    call it from the training thread, at the same step on every rank), with everything copied by `copy`.
    Nothing of `state` is referenced by the result, so training may change it at once."""
    plan = _plan(state, pack_below_bytes)
    with torch.no_grad():  # parameters: no autograd graph for the copies
        gathered = {i: copy(plan.leaves[i].path, full) for i, full in _gather_small(plan).items()}
        sharded: dict[int, _Sharded] = {}
        for i, sh in plan.sharded.items():
            local = gathered[i] if sh.packed else copy(plan.leaves[i].path, sh.dt.to_local())
            sharded[i] = replace(sh, dt=_HostPiece(local, sh.dt.dtype, sh.dt.numel()))
        leaves = [
            Leaf(leaf.path, sharded[i].dt.to_local() if i in sharded else _host_value(copy, leaf))
            for i, leaf in enumerate(plan.leaves)
        ]
    return HostSnapshot(replace(plan, leaves=leaves, sharded=sharded), gathered)


def _gather_small(plan: _Plan) -> dict[int, torch.Tensor]:
    """Phase 2's collective: every small DTensor whole (full_tensor, in leaf order on every rank)."""
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():  # parameters: no autograd graph for the gather
        for i, sh in plan.sharded.items():
            v = plan.leaves[i].value
            if sh.packed and isinstance(v, DTensor):
                out[i] = v.full_tensor()
    return out


def _host_value(copy: HostCopy, leaf: Leaf) -> torch.Tensor | np.ndarray[Any, Any]:
    v = leaf.value
    return copy(leaf.path, v) if isinstance(v, torch.Tensor) else np.array(v, copy=True)


def _plan(state: Any, pack_below_bytes: int) -> _Plan:
    skeleton, leaves = flatten(state)
    world = dist.get_world_size()
    sharded: dict[int, _Sharded] = {}
    described: list[Any] = []
    for i, leaf in enumerate(leaves):
        v = leaf.value
        if shards.is_dtensor(v):
            layout = shards.layout_of(leaf.path, v)
            nbytes = v.numel() * v.dtype.itemsize
            packed = nbytes < pack_below_bytes and v.device_mesh.size() == world
            chunks = None if packed else shards.chunk_shape(layout)
            piece = None if packed else shards.local_piece(layout, v)
            sharded[i] = _Sharded(v, layout, packed, chunks, piece)
            described.append([leaf.path, list(v.shape), str(v.dtype), layout.record(), packed])
        else:
            described.append([leaf.path, list(v.shape), str(v.dtype)])
    digest = hashlib.sha256(json.dumps(described).encode()).hexdigest()
    return _Plan(skeleton, leaves, sharded, digest)


def _write_rank0(
    folder: Path,
    plan: _Plan,
    gathered: dict[int, Any],
    meta: dict[str, Any] | None,
    step: int,
    compression: Compression,
    pack_below_bytes: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0's part of phase 2: the group, every whole array, the DTensors' empty arrays.
    Returns (the skeleton attribute, the marker's summary)."""
    stored = StoredLeaves(pack_below_bytes)
    empty: list[tuple[str, tuple[int, ...], np.dtype[Any], tuple[int, ...]]] = []
    dtensors: dict[str, Any] = {}
    nbytes = 0
    for i, leaf in enumerate(plan.leaves):
        sh = plan.sharded.get(i)
        if sh is not None and not sh.packed:
            assert sh.chunks is not None
            dtype = stored_dtype(sh.dt.dtype)
            shape = sh.layout.global_shape
            stored.add_record({**tensor_record(sh.dt.dtype, shape, dtype), "array": leaf.path})
            empty.append((leaf.path, shape, dtype, sh.chunks))
            nbytes += sh.dt.numel() * dtype.itemsize
        else:
            stored.add(leaf.path, gathered[i] if sh is not None else leaf.value)
        if sh is not None:
            dtensors[leaf.path] = {**sh.layout.record(), "chunks": None if sh.chunks is None else list(sh.chunks)}
    arrays = stored.arrays()
    nbytes += sum(a.nbytes for _, a in arrays)
    attrs = {
        "format": FORMAT, "step": step, "meta": meta or {}, "skeleton": plan.skeleton, "leaves": stored.records,
        "layout": {"world_size": dist.get_world_size(), "dtensors": dtensors},
    }  # fmt: skip

    folder.mkdir(parents=True)
    sync(create_group(folder))
    write_arrays(folder, arrays, compression, fsync=False)  # fsynced and hashed at the commit (_fsync_rest)
    write_groups(folder, [n for n, _, _, _ in empty], fsync=False)
    for n, s, d, c in empty:
        _create_sharded(folder, n, s, d, c, compression)
    return attrs, marker_summary(plan.skeleton, stored.records, len(arrays) + len(empty), int(nbytes))


def _create_sharded(
    folder: Path,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    chunks: tuple[int, ...],
    compression: Compression,
) -> None:
    """A DTensor's array, without data (its zarr.json): the ranks write its chunks."""
    if compression == "none":
        write_metadata(folder, name, shape, dtype, chunks, fsync=False)
    else:
        zarr.create_array(
            store=LocalStore(str(folder)), name=name, shape=shape, dtype=dtype, chunks=chunks,
            compressors=compressors_for(compression),
        )  # fmt: skip


@dataclass
class _PieceSink:
    """Where phase 3 writes: the group's folder, whether to fsync, and the digests of the chunks written
    (hashed as they were written; a compressed chunk, written by zarr-python, is hashed afterwards)."""

    folder: Path
    fsync: bool
    digests: dict[str, FileDigest]


async def _write_piece(sink: Any, name: str, region: tuple[slice, ...], arr: np.ndarray[Any, Any]) -> str:
    """Write this rank's piece (exactly one chunk) of array `name`; return the chunk's key under the
    group. (A module-level function so tests can make it fail, or watch which rank writes what.)"""
    assert isinstance(sink, _PieceSink)
    raw = raw_array(sink.folder, name, None)
    if raw is not None:  # uncompressed: written and hashed here, padded to the chunk if it is the last
        coords = tuple(r.start // c for r, c in zip(region, raw.chunks, strict=True))
        key, digest = await asyncio.to_thread(write_chunk, sink.folder, name, coords, arr, raw.chunks, sink.fsync)
        sink.digests[key] = digest
        return key
    z = await (await open_group(sink.folder)).getitem(name)
    assert isinstance(z, AsyncArray)
    # Write chunks that equal the fill value too: -0.0 == 0.0, so skipping them is not exact.
    z = z.with_config({"write_empty_chunks": True})
    await z.setitem(region, arr)
    coords = tuple(r.start // c for r, c in zip(region, z.chunks, strict=True))
    return f"{name}/{z.metadata.encode_chunk_key(coords)}"


def _write_pieces(folder: Path, plan: _Plan, fsync: bool) -> dict[str, FileDigest]:
    """Phase 3 on every rank: the pieces this rank owns, one chunk each, fsynced; returns their checksums."""
    mine = [
        (i, sh) for i, sh in plan.sharded.items() if sh.piece is not None and sh.piece.writer and not sh.piece.empty
    ]

    sink = _PieceSink(folder, fsync, {})

    async def write() -> list[str]:
        sem = asyncio.Semaphore(_CONCURRENT_PIECES)
        failed = False

        async def one(i: int, sh: _Sharded) -> str:
            nonlocal failed
            assert sh.piece is not None
            async with sem:
                if failed:
                    return ""
                arr, _ = stored_array(sh.dt.to_local())
                try:
                    return await _write_piece(sink, plan.leaves[i].path, sh.piece.region(), arr)
                except BaseException:
                    failed = True
                    raise

        # As for whole arrays: no cancellation, the in-flight writes finish before the error is raised.
        results = await asyncio.gather(*(one(i, sh) for i, sh in mine), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, str)]

    rest = [key for key in sync(write()) if key not in sink.digests]  # compressed: written by zarr-python
    if fsync:
        for key in rest:
            fsync_path(folder / key)
    return {**sink.digests, **digest_files(folder, rest)}


def _fsync_rest(folder: Path, plan: _Plan) -> None:
    """Rank 0's fsync: every folder (the other ranks' new directory entries) and every file but the
    DTensors' chunks (their writers fsynced them)."""
    skip = {folder / plan.leaves[i].path / "c" for i, sh in plan.sharded.items() if not sh.packed}
    for dirpath, _, files in os.walk(folder, topdown=False):
        d = Path(dirpath)
        if d not in skip and skip.isdisjoint(d.parents):
            for f in files:
                fsync_path(d / f)
        fsync_path(d)


def save_collective(
    ckpt_root: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    meta: dict[str, Any] | None = None,
    *,
    compression: Compression = "none",
    pack_below_bytes: int = PACK_BELOW_BYTES,
    fsync: bool = True,
    stale_after_s: float = 3600.0,
    keep_every: int | None = None,
    protected: frozenset[int] = frozenset(),
    snapshot: HostSnapshot | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """save_checkpoint on every rank of the default process group; all ranks return the same path.

    With `snapshot` (`snapshot_collective` of the state, taken earlier; `state` is then ignored) nothing
    but the status exchanges is a collective, and they run on `group` (None: the default group): an
    asynchronous save calls this from its worker thread with a gloo group of all ranks."""
    rank = dist.get_rank()
    what = f"checkpoint {Path(ckpt_root) / checkpoint_name(step)}"

    # Phase 1: plan, compare, learn rank 0's folder.
    plan: _Plan | None = None
    error: BaseException | None = None
    try:
        plan = snapshot.plan if snapshot is not None else _plan(state, pack_below_bytes)
    except BaseException as e:
        error = e
    tmp_name = temporary_name(step) if rank == 0 else None
    got = _exchange(what, error, (plan.digest if plan else None, tmp_name), group)
    assert plan is not None
    differ = [r for r, (digest, _) in enumerate(got) if digest != got[0][0]]
    if differ:  # the same on every rank: all raise here, before any collective that could mismatch
        raise ValueError(
            f"{what}: ranks {differ} passed state trees whose leaves (paths, shapes, dtypes, DTensor layouts) "
            f"differ from rank 0's; every rank must pass the same structure"
        )
    tmp = Path(ckpt_root) / got[0][1]
    final = Path(ckpt_root) / checkpoint_name(step)

    with contextlib.ExitStack() as claims:
        if rank == 0:
            claims.enter_context(claimed(tmp))
            claims.enter_context(claimed(final))
        try:
            # Phase 2: gather the small DTensors; rank 0 lays out the group.
            attrs: dict[str, Any] = {}
            summary: dict[str, Any] = {}
            try:
                gathered = snapshot.gathered if snapshot is not None else _gather_small(plan)
                if rank == 0:
                    Path(ckpt_root).mkdir(parents=True, exist_ok=True)
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    attrs, summary = _write_rank0(tmp, plan, gathered, meta, step, compression, pack_below_bytes)
                del gathered
                error = None
            except BaseException as e:
                error = e
            _exchange(what, error, group=group)

            # Phase 3: every rank writes its own chunks and hashes them.
            digests: dict[str, FileDigest] = {}
            try:
                digests = _write_pieces(tmp, plan, fsync)
                error = None
            except BaseException as e:
                error = e
            pieces: dict[str, FileDigest] = {}
            for theirs in _exchange(what, error, digests, group):
                pieces.update(theirs)

            # Phase 4: rank 0 commits.
            error = None
            if rank == 0:
                try:
                    sync(_set_attrs(tmp, attrs))  # metadata last
                    if fsync:
                        _fsync_rest(tmp, plan)
                    commit(Path(ckpt_root), step, tmp, {**summary, **manifest(tmp, known=pieces)})
                except BaseException as e:
                    error = e
            _exchange(what, error, group=group)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if rank == 0:
        prune_checkpoints(
            Path(ckpt_root), keep_last, keep_every=keep_every, protected=protected, stale_after_s=stale_after_s
        )
    return final


async def _set_attrs(folder: Path, attrs: dict[str, Any]) -> None:
    """Phase 4's first write: the skeleton attribute, into the group every rank has written."""
    await set_attrs(await open_group(folder), attrs)
