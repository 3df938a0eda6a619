"""Checksums of a checkpoint's files: recorded in its commit marker, checked before any byte is used.

When a checkpoint is committed, its COMMITTED marker records every file of its Zarr group (all but
the marker itself): `files` = {path relative to the step folder: [size, checksum hex]} and
`checksum` = "crc32" (ALGORITHM; older markers say "sha256" and are verified with it). The files
trinity writes itself (uncompressed arrays) are checksummed block by block from memory as they are
written (trinity.store.checkpoint_zarr.write_file: no second read); the others (compressed arrays,
the root zarr.json) after the write, as they lie on disk. Whatever changes a file later (a lost
chunk, flipped bits, a truncation) no longer matches. In a collective save each rank hashes the
chunks it wrote and rank 0 the rest (trinity.store.checkpoint_dist), so no rank reads another's data.

Loading (trinity.store.checkpoint.load_checkpoint) verifies what it uses: the root zarr.json before
the skeleton attribute is read, each array's zarr.json before its chunks, and every chunk as it is
read: uncompressed chunks by trinity.store.checkpoint_zarr.read_raw, hashed as they arrive in their
destination; compressed ones by zarr-python through `VerifyingStore` (the bytes are hashed once, on
their way to the decoder). All chunks of an array read whole, the chunks meeting this rank's
rectangle in a resharding load. A chunk the marker records must exist: Zarr would silently read a
missing chunk as its fill value (zeros), and checkpoints always write every chunk (also all-zero
ones), so a missing chunk file is damage, never data. A problem is a CheckpointError naming the
checkpoint and the array.

A marker written before checksums existed (no `files`) is verified structurally only, before the
read: every chunk of every array read must exist (`verify_chunks`); its bytes cannot be checked.
`check_checkpoint` verifies all of a checkpoint and returns the problems instead of raising
(`trinity verify`).

crc32 (zlib) rather than sha256 since issue 16: ~3.4 GB/s per core here against ~1.5, and the
checksum is there to catch damage (a lost or truncated chunk, flipped bits), not tampering; with
sha256, hashing cost more CPU than torch.save's whole write (trinity.store.checkpoint_zarr.ALGORITHM).
Files are hashed on up to 8 threads (zlib and hashlib release the GIL).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from trinity.errors import CheckpointError
from trinity.store.checkpoint_commit import MARKER, read_marker, skeleton_digest
from trinity.store.checkpoint_encoding import PACKED
from trinity.store.checkpoint_zarr import ALGORITHM, Selection, changed, hasher, read_attrs
from trinity.store.checkpoint_zarr import FileDigest as FileDigest  # re-exported: the marker's record of a file

METADATA = "zarr.json"
_THREADS = min(8, os.cpu_count() or 1)
_BLOCK = 8 * 1024 * 1024


def algorithm_of(marker: Mapping[str, Any]) -> str:
    """The checksum a marker's `files` hold: its `checksum` field ("sha256" before crc32 existed)."""
    return str(marker.get("checksum", "sha256"))


# --------------------------------------------------------------------------------------------
# Hashing at commit


def digest_file(path: Path, algorithm: str = ALGORITHM) -> FileDigest:
    if algorithm == "sha256":
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, algorithm).hexdigest()
        return [path.stat().st_size, digest]
    h, size = hasher(algorithm), 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            h.update(block)
            size += len(block)
    return [size, h.hexdigest()]


def digest_files(folder: Path, relpaths: Iterable[str], algorithm: str = ALGORITHM) -> dict[str, FileDigest]:
    """{relative path: [size, checksum]} of the files `relpaths` under `folder`, hashed in parallel."""
    names = sorted(relpaths)
    with ThreadPoolExecutor(_THREADS) as pool:
        digests = list(pool.map(lambda r: digest_file(folder / r, algorithm), names))
    return dict(zip(names, digests, strict=True))


def all_files(folder: Path) -> list[str]:
    """Every file under `folder` (relative, '/'-separated) but the commit marker and its temporary file."""
    out = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            rel = (Path(dirpath) / f).relative_to(folder).as_posix()
            if rel not in (MARKER, f".{MARKER}.tmp"):
                out.append(rel)
    return out


def manifest(folder: Path, known: Mapping[str, FileDigest] | None = None) -> dict[str, Any]:
    """The marker's integrity fields for the finished group at `folder`: every file hashed, except those
    already in `known` (the chunks other ranks hashed), which are taken as given."""
    known = dict(known or {})
    todo = [r for r in all_files(folder) if r not in known]
    return {"checksum": ALGORITHM, "files": {**digest_files(folder, todo), **known}}


# --------------------------------------------------------------------------------------------
# Verifying


def _array_of(rel: str, arrays: Sequence[str]) -> str:
    """The array a file belongs to (for messages): the longest array name that is a folder above it."""
    owners = [a for a in arrays if rel.startswith(a + "/")]
    return max(owners, key=len) if owners else "the group metadata"


def _chunk_keys(path: Path, name: str, selection: Selection) -> list[str]:
    """The chunk files (relative to the checkpoint) of array `name` that reading `selection` touches."""
    arr = zarr.open_array(store=LocalStore(str(path), read_only=True), path=name, mode="r")
    grid = arr.cdata_shape
    if selection is Ellipsis:
        ranges = [range(n) for n in grid]
    else:
        ranges = []
        for sl, c, n in zip(selection, arr.chunks, grid, strict=True):
            start, stop = sl.start or 0, sl.stop if sl.stop is not None else n * c
            ranges.append(range(start // c, min(n, math.ceil(stop / c))) if stop > start else range(0))
    return [f"{name}/{arr.metadata.encode_chunk_key(c)}" for c in itertools.product(*ranges)]


def _file_problems(
    path: Path, files: Mapping[str, FileDigest], wanted: Iterable[str], algorithm: str
) -> dict[str, str]:
    """{relative path: what is wrong} for the files `wanted`, checked against `files` (the marker's)."""

    def one(rel: str) -> str | None:
        f = path / rel
        if not f.is_file():
            return "is missing"
        if rel not in files:
            return f"is not recorded in the {MARKER} marker"
        size, digest = files[rel]
        if f.stat().st_size != size:
            return f"has {f.stat().st_size} bytes, the {MARKER} marker records {size}"
        if digest_file(f, algorithm)[1] != digest:
            return changed(algorithm)
        return None

    names = sorted(set(wanted))
    with ThreadPoolExecutor(_THREADS) as pool:
        results = list(pool.map(one, names))
    return {rel: msg for rel, msg in zip(names, results, strict=True) if msg is not None}


def _metadata_problems(path: Path, files: Mapping[str, FileDigest] | None, algorithm: str) -> list[str]:
    """The metadata files (every zarr.json: the skeleton attribute, each array's grid) as committed."""
    if files is None:
        return [] if (path / METADATA).is_file() else [f"{path}: {METADATA} is missing"]
    meta = [r for r in files if r == METADATA or r.endswith("/" + METADATA)]
    return [f"{path}: {rel} {msg}" for rel, msg in _file_problems(path, files, meta, algorithm).items()]


def array_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The arrays of a checkpoint, from its leaf records."""
    packed = [PACKED] if any("packed" in r for r in records) else []
    return [r["array"] for r in records if "array" in r] + packed


def _chunk_problems(
    path: Path,
    files: Mapping[str, FileDigest] | None,
    wanted: Sequence[tuple[str, Selection]],
    arrays: Sequence[str],
    algorithm: str,
) -> list[str]:
    """Every chunk the reads `wanted` touch exists (and, with `files`, is as committed)."""
    problems: list[str] = []
    chunks: list[str] = []
    for name, selection in wanted:
        try:
            chunks += _chunk_keys(path, name, selection)
        except (ValueError, KeyError, OSError, zarr.errors.BaseZarrError) as exc:
            problems.append(f"{path}: array {name}: its metadata cannot be read ({exc})")
    if files is None:
        bad = {rel: "is missing" for rel in chunks if not (path / rel).is_file()}
    else:
        bad = _file_problems(path, files, chunks, algorithm)
    for rel, msg in bad.items():
        name = _array_of(rel, arrays)
        problems.append(f"{path}: array {name}: chunk {rel[len(name) + 1 :]} {msg}")
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more; `trinity verify` lists them)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint damaged: {problems[0]}{more}")


def verify_metadata(path: Path, marker: Mapping[str, Any]) -> None:
    """Before a load reads the skeleton attribute: raise CheckpointError unless the root zarr.json is as
    committed (the other metadata files are checked as Zarr reads them, by the VerifyingStore)."""
    files: Mapping[str, FileDigest] | None = marker.get("files")
    if files is None:
        _raise(_metadata_problems(Path(path), None, algorithm_of(marker)))
    else:
        problems = _file_problems(Path(path), files, [METADATA], algorithm_of(marker))
        _raise([f"{path}: {rel} {msg}" for rel, msg in problems.items()])


def verify_chunks(
    path: Path, marker: Mapping[str, Any], wanted: Sequence[tuple[str, Selection]], records: Sequence[Mapping[str, Any]]
) -> None:
    """Before a load reads `wanted` ((array, selection)...): raise CheckpointError unless every chunk it
    touches exists and (with checksums in the marker) is as committed."""
    _raise(_chunk_problems(Path(path), marker.get("files"), wanted, array_names(records), algorithm_of(marker)))


class VerifyingStore(WrapperStore[LocalStore]):
    """The read-only LocalStore of a checkpoint that checks every whole file Zarr reads against the
    marker's `files` (size, sha256) and raises CheckpointError for a recorded file that is missing,
    instead of letting Zarr read a missing chunk as its fill value. Files the marker does not record
    (Zarr's probes for v2 metadata) pass through; reads of byte ranges (sharded arrays, which
    checkpoints do not use) are not checked."""

    def __init__(
        self,
        store: LocalStore,
        checkpoint: Path,
        files: Mapping[str, FileDigest],
        arrays: Sequence[str],
        algorithm: str = ALGORITHM,
    ) -> None:
        super().__init__(store)
        self._checkpoint, self._files, self._arrays, self._algorithm = checkpoint, files, arrays, algorithm

    def _with_store(self, store: LocalStore) -> VerifyingStore:
        return type(self)(store, self._checkpoint, self._files, self._arrays, self._algorithm)

    def _damaged(self, key: str, msg: str) -> CheckpointError:
        name = _array_of(key, self._arrays)
        rest = key[len(name) + 1 :]
        where = f"array {name}: chunk {rest}" if key.startswith(name + "/") and rest != METADATA else key
        return CheckpointError(f"checkpoint damaged: {self._checkpoint}: {where} {msg}")

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        expected = self._files.get(key)
        if expected is None or byte_range is not None:
            return buf
        if buf is None:
            raise self._damaged(key, "is missing")
        if len(buf) != expected[0]:
            raise self._damaged(key, f"has {len(buf)} bytes, the {MARKER} marker records {expected[0]}")
        data = buf.as_numpy_array()
        digest = await asyncio.to_thread(self._digest, data)  # the GIL is released
        if digest != expected[1]:
            raise self._damaged(key, changed(self._algorithm))
        return buf

    def _digest(self, data: Any) -> str:
        h = hasher(self._algorithm)
        h.update(data.data)
        return str(h.hexdigest())

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


def reading_store(path: Path, marker: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Any:
    """The store a load reads checkpoint `path` through: a VerifyingStore when the marker has checksums;
    for an older marker, the plain LocalStore after `verify_chunks` (structure only) by the caller."""
    store = LocalStore(str(path), read_only=True)
    files = marker.get("files")
    if files is None:
        return store
    return VerifyingStore(store, Path(path), files, array_names(records), algorithm_of(marker))


def check_checkpoint(path: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) of the committed checkpoint at `path`: every metadata file, every chunk of every
    array. Each problem is one line naming the checkpoint and the array or file."""
    path = Path(path)
    try:
        marker = read_marker(path)
    except (CheckpointError, OSError) as exc:
        return [str(exc)], []
    files: Mapping[str, FileDigest] | None = marker.get("files")
    notes = [] if files is not None else [f"{path}: no checksums in its {MARKER} marker (an older checkpoint): "
                                          "checked structurally (every chunk present), not its bytes"]  # fmt: skip
    algorithm = algorithm_of(marker)
    problems = _metadata_problems(path, files, algorithm)
    if problems:
        return problems, notes
    try:
        attrs = read_attrs(path)
    except (ValueError, OSError) as exc:
        return [f"{path}: the group metadata cannot be read ({exc})"], notes
    records = attrs.get("leaves", [])
    if skeleton_digest(attrs.get("skeleton"), records) != marker.get("skeleton_sha256"):
        return [f"{path}: the skeleton attribute does not match its {MARKER} marker"], notes
    arrays = array_names(records)
    problems = _chunk_problems(path, files, [(a, ...) for a in arrays], arrays, algorithm)
    if files is not None:  # files the marker records that no array accounts for (e.g. a group's zarr.json)
        rest = [r for r in files if _array_of(r, arrays) == "the group metadata" and not r.endswith(METADATA)]
        problems += [f"{path}: {rel} {msg}" for rel, msg in _file_problems(path, files, rest, algorithm).items()]
    return problems, notes
