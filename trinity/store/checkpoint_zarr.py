"""The Zarr v3 group of one checkpoint: its attributes, its arrays, and how they are written and read.

    step-00000100/
      zarr.json            root group: attribute `trinity_writer` = {host, pid} written first
                           (trinity.store.checkpoint_commit), attribute `trinity_checkpoint` =
                           {format, step, meta, skeleton, leaves[, layout]} written LAST
                           (skeleton: trinity.store.tree; leaves: trinity.store.checkpoint_encoding)
      model/<name>         one array per large leaf, e.g. model/layers.0.attn.wq.weight
      optimizer/state.3.exp_avg ...
      %packed              the small leaves, concatenated as bytes

An array up to CHUNK_BYTES (128 MiB) is one chunk; a larger one is split into equal slabs along
dim 0. Every chunk is written, also one that equals the fill value (-0.0 == 0.0, so skipping it
would not be exact).

Uncompressed arrays (the default) are written and read by this module itself, not through
zarr-python: each array's zarr.json (zarr-python's own metadata for that shape and dtype, see
`array_metadata`) and its chunk files in the `bytes` codec (the raw little-endian C-order bytes,
padded with the fill value 0 to the full chunk), the same files zarr-python writes and reads
(tests/store/test_checkpoint_format.py opens every array of a checkpoint with zarr-python).
Why: zarr-python's asynchronous store costs milliseconds per array and copies every chunk, and the
checksums (trinity.store.checkpoint_integrity) then read every file a second time. Here each file
is written (os.write) and checksummed (ALGORITHM) block by block from the tensor's memory, up to
THREADS files at a time (os.write, readinto and zlib.crc32 release the GIL); then every file and
folder is fsynced, FSYNC_THREADS at a time. A load reads each chunk with readinto straight into the
destination array, checksumming each block as it arrives. With fewer files (leaves under 8 MiB
packed, trinity.store.checkpoint_encoding) the medium benchmark state (616 MB fp32) saves durably at
0.8-1.1x of torch.save + fsync and loads from disk at 0.8-1.7x of torch.load on the 2-core machine
(it was 0.20x and 0.39x through zarr-python; bench/README.md, "Checkpoints"). Compressed arrays
(`compression="zstd"|"lz4"`) go through zarr-python.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal, TypeVar

import numpy as np
import zarr
import zarr.api.asynchronous as za
from zarr import AsyncArray
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore, MemoryStore

from trinity.errors import CheckpointError
from trinity.run.layout import fsync_path
from trinity.store.checkpoint_commit import MARKER, WRITER_ATTR, writer_record
from trinity.store.checkpoint_encoding import PackedBytes, StoredArray

ATTR = "trinity_checkpoint"
FORMAT = 1
CHUNK_BYTES = 128 * 1024 * 1024  # arrays up to this size are one chunk; larger ones are split along dim 0
METADATA = "zarr.json"
THREADS = 8
"""Files written or read at a time (each by its own thread: os.write, readinto, crc32 release the GIL).
Not tied to the core count: the threads mostly wait on the disk, and a deeper queue of reads and writes
is what a disk wants (2 cores here: with 8 threads instead of 2 the cold load of the benchmark state
went from 0.92-0.98x to 0.8-1.3x of torch.load over two runs, i.e. within the machine's noise, and
never worse on saves)."""
FSYNC_THREADS = 32
"""fsyncs at a time once a checkpoint's files are written: they wait on the disk, not the CPU, and the
file system commits concurrent ones together (medium benchmark state: 1.3 s to write and fsync all
files this way, 2.0 s with each file fsynced by its writer thread right after its write)."""
_BLOCK = 8 * 1024 * 1024  # bytes per os.write / readinto, each hashed right after
_CONCURRENT_ARRAYS = 16  # zarr-python (compressed) arrays read at a time
ALGORITHM = "crc32"
"""The checksum of every file of a new checkpoint, in its marker (`checksum`); markers of older
checkpoints say "sha256" and are verified with it. CRC-32 (zlib, the GIL released): corruption, not
tampering, is what it is for (the marker beside the files could be edited as easily), and it runs at
~3.4 GB/s per core here against sha256's ~1.5: with sha256 the hashing alone cost more CPU than
torch.save's whole write (bench/README.md, "Checkpoints")."""

Compression = Literal["none", "zstd", "lz4"]
Selection = tuple[slice, ...] | EllipsisType
"""What to read of an array: Ellipsis for all of it, or one rectangle."""
FileDigest = list[Any]
"""[size in bytes, checksum hex] of one file, as the commit marker records it (JSON: a list)."""
_T = TypeVar("_T")


class _Crc32:
    """zlib.crc32 with hashlib's update/hexdigest."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: Any) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def hexdigest(self) -> str:
        return f"{self._crc:08x}"


def hasher(algorithm: str) -> Any:
    """A new running checksum of `algorithm` ("crc32" or "sha256"): update(bytes), hexdigest()."""
    if algorithm == "crc32":
        return _Crc32()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise CheckpointError(f"unknown checksum {algorithm!r} in a {MARKER} marker")


def changed(algorithm: str) -> str:
    """What is wrong with a file whose bytes no longer match the marker."""
    return f"does not match its {algorithm} checksum in the {MARKER} marker (its bytes changed)"


def compressors_for(compression: Compression) -> Any:
    """The zarr compressors for `compression` (fast levels: a checkpoint is written often, read rarely)."""
    if compression == "none":
        return None
    if compression == "zstd":
        return ZstdCodec(level=1)
    return BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")


def array_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One chunk up to CHUNK_BYTES; beyond, equal slabs along dim 0 (little padding in the last)."""
    whole = tuple(max(1, s) for s in shape)
    nbytes = math.prod(shape) * itemsize
    if nbytes <= CHUNK_BYTES or shape[0] <= 1:
        return whole
    n = math.ceil(nbytes / (CHUNK_BYTES // 2))
    return (math.ceil(shape[0] / n), *whole[1:])


def chunk_key(coords: Sequence[int]) -> str:
    """The chunk file of the chunk at grid `coords`, relative to its array (Zarr v3's default
    encoding with '/': c/0/1; "c" for a 0-d array)."""
    return "/".join(["c", *map(str, coords)])


@functools.cache
def _metadata_template(dtype: str) -> str:
    """zarr-python's zarr.json of an uncompressed 1-element array of numpy dtype `dtype` (as JSON text)."""
    store = MemoryStore()
    zarr.create_array(store=store, shape=(1,), dtype=np.dtype(dtype), chunks=(1,), compressors=None)
    return bytes(store._store_dict[METADATA].to_bytes()).decode()


@functools.cache
def _group_metadata() -> bytes:
    """zarr-python's zarr.json of a group it creates on the way to an array (e.g. `model` of model/w)."""
    store = MemoryStore()
    zarr.create_array(store=store, name="g/a", shape=(1,), dtype="f4", compressors=None)
    return bytes(store._store_dict[f"g/{METADATA}"].to_bytes())


def array_metadata(shape: Sequence[int], dtype: np.dtype[Any], chunks: Sequence[int]) -> bytes:
    """The zarr.json zarr-python writes for an uncompressed array (bytes codec, default chunk keys) of
    this shape, dtype and chunk shape: its metadata for the dtype, with the shape and chunk shape set."""
    meta = json.loads(_metadata_template(dtype.str))
    meta["shape"] = list(shape)
    meta["chunk_grid"]["configuration"]["chunk_shape"] = list(chunks)
    return json.dumps(meta, allow_nan=True, indent=zarr.config.get("json_indent")).encode()


def _run_all(fn: Callable[..., _T], items: Iterable[tuple[Any, ...]], threads: int = THREADS) -> list[_T]:
    """fn(*item) for every item on THREADS threads, in order. On a failure no new call starts, the ones
    running finish (a thread cannot be stopped mid-write), then the first error is raised."""
    failed = False

    def one(item: tuple[Any, ...]) -> _T | None:
        nonlocal failed
        if failed:
            return None
        try:
            return fn(*item)
        except BaseException:
            failed = True
            raise

    with ThreadPoolExecutor(threads) as pool:
        futures: list[Future[_T | None]] = [pool.submit(one, item) for item in items]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    return [f.result() for f in futures]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Writing


def write_file(path: Path, parts: Iterable[memoryview | bytes], fsync: bool) -> FileDigest:
    """Write the concatenated bytes of `parts` as the file `path`, hashing each block as it is written
    (no second read), fsynced if `fsync`; its [size, ALGORITHM digest]."""
    h = hasher(ALGORITHM)
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for part in parts:
            mv = memoryview(part).cast("B")
            while mv:
                n = os.write(fd, mv[:_BLOCK])
                h.update(mv[:n])
                mv = mv[n:]
                size += n
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return [size, h.hexdigest()]


def write_chunk(
    folder: Path, name: str, coords: Sequence[int], piece: np.ndarray[Any, Any], chunks: Sequence[int], fsync: bool
) -> tuple[str, FileDigest]:
    """The chunk at `coords` of uncompressed array `name` (under the group at `folder`), holding `piece`
    (the chunk's part inside the array: padded with the fill value 0 where it is smaller than the chunk).
    Returns (its key under the group, its digest)."""
    if tuple(piece.shape) != tuple(chunks):
        full = np.zeros(tuple(chunks), piece.dtype)
        full[tuple(slice(0, s) for s in piece.shape)] = piece
        piece = full
    rel = f"{name}/{chunk_key(coords)}"
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    return rel, write_file(folder / rel, [np.ascontiguousarray(piece).data], fsync)


def write_metadata(
    folder: Path, name: str, shape: Sequence[int], dtype: np.dtype[Any], chunks: Sequence[int], fsync: bool
) -> tuple[str, FileDigest]:
    """The zarr.json of uncompressed array `name`: the array exists, its chunks are written apart."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    rel = f"{name}/{METADATA}"
    return rel, write_file(folder / rel, [array_metadata(shape, dtype, chunks)], fsync)


def write_array(
    folder: Path, name: str, arr: StoredArray, compression: Compression, fsync: bool
) -> dict[str, FileDigest]:
    """One whole array under the group at `folder`; the digests of its files (none when compressed: those
    are hashed after the write). %packed (`PackedBytes`) is written from its parts, each chunk file by
    its own thread. (A module-level function so tests can make it fail or stall.)"""
    chunks = array_chunks(arr.shape, arr.itemsize)
    if compression != "none":
        whole = arr.concatenated() if isinstance(arr, PackedBytes) else arr
        z = zarr.create_array(
            store=LocalStore(str(folder)), name=name, shape=whole.shape, dtype=whole.dtype, chunks=chunks,
            compressors=compressors_for(compression), config={"write_empty_chunks": True},
        )  # fmt: skip
        z[...] = whole
        return {}
    rel, digest = write_metadata(folder, name, arr.shape, arr.dtype, chunks, fsync)
    out = {rel: digest}
    if isinstance(arr, PackedBytes):
        (folder / name / "c").mkdir(exist_ok=True)
        step = chunks[0]
        starts = range(0, arr.nbytes, step)
        out.update(_run_all(lambda a: _write_packed_chunk(folder, name, arr, a, step, fsync), [(a,) for a in starts]))
        return out
    if arr.ndim == 0:
        out.update([write_chunk(folder, name, (), arr, (), fsync)])
        return out
    rows = chunks[0]
    for i in range(math.ceil(arr.shape[0] / rows) if arr.size else 0):  # an empty array has no chunks
        coords = (i, *[0] * (arr.ndim - 1))
        out.update([write_chunk(folder, name, coords, arr[i * rows : (i + 1) * rows], chunks, fsync)])
    return out


def _write_packed_chunk(
    folder: Path, name: str, packed: PackedBytes, start: int, chunk: int, fsync: bool
) -> tuple[str, FileDigest]:
    """The chunk of %packed that starts at byte `start`: its parts' bytes, zero-padded to `chunk` bytes."""
    parts: list[memoryview | bytes] = list(packed.byte_range(start, min(start + chunk, packed.nbytes)))
    pad = start + chunk - packed.nbytes
    if pad > 0:
        parts.append(bytes(pad))
    rel = f"{name}/{chunk_key((start // chunk,))}"
    return rel, write_file(folder / rel, parts, fsync)


def write_groups(folder: Path, names: Iterable[str], fsync: bool) -> dict[str, FileDigest]:
    """The zarr.json of every group above the arrays `names` (model/w: the group `model`), as zarr-python
    writes them on the way to an array; their digests."""
    groups = sorted({"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)})
    out = {}
    for g in groups:
        (folder / g).mkdir(parents=True, exist_ok=True)
        out[f"{g}/{METADATA}"] = write_file(folder / g / METADATA, [_group_metadata()], fsync)
    return out


def write_arrays(
    folder: Path, arrays: Sequence[tuple[str, StoredArray]], compression: Compression, fsync: bool
) -> dict[str, FileDigest]:
    """Every (name, array) of `arrays` under the group at `folder`, THREADS at a time; the digests of the
    files written (uncompressed ones). On a failure the arrays started finish, then it raises."""
    out = write_groups(folder, [n for n, _ in arrays], fsync)
    for digests in _run_all(lambda n, a: write_array(folder, n, a, compression, fsync), arrays):
        out.update(digests)
    return out


def fsync_unsynced(folder: Path, synced: Iterable[str]) -> None:
    """fsync every folder under `folder` and every file but those `synced` (relative paths) already
    fsynced as they were written, THREADS at a time (the disk batches concurrent syncs)."""
    done = set(synced)
    paths = []
    for dirpath, _, names in os.walk(folder):
        d = Path(dirpath)
        paths += [d / f for f in names if (d / f).relative_to(folder).as_posix() not in done]
        paths.append(d)
    _run_all(fsync_path, [(p,) for p in paths], FSYNC_THREADS)


async def create_group(folder: Path) -> Any:
    """The new root group at `folder`, holding only who writes it."""
    return await za.create_group(
        store=LocalStore(str(folder)), attributes={WRITER_ATTR: writer_record()}, zarr_format=3
    )


async def open_group(folder: Path) -> Any:
    """The root group at `folder`, to write more into."""
    return await za.open_group(store=LocalStore(str(folder)), mode="r+")


async def set_attrs(root: Any, attrs: dict[str, Any]) -> None:
    """Write the checkpoint attribute: the last write of a checkpoint's group."""
    await root.update_attributes({ATTR: attrs})


# --------------------------------------------------------------------------------------------
# Reading


def read_attrs(path: Path) -> dict[str, Any]:
    """The checkpoint attribute of the group at `path`; a ValueError if it is not one of FORMAT."""
    try:
        group = json.loads((Path(path) / METADATA).read_bytes())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a trinity checkpoint of format {FORMAT} ({exc})") from exc
    attrs = group.get("attributes", {}).get(ATTR) if isinstance(group, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trinity checkpoint of format {FORMAT}")
    return attrs


@dataclass(frozen=True)
class RawArray:
    """An uncompressed array this module reads itself: its name, shape, numpy dtype and chunk shape."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunks: tuple[int, ...]


def _damaged(path: Path, rel: str, name: str, msg: str) -> CheckpointError:
    """The error for file `rel` of array `name`, worded as trinity.store.checkpoint_integrity words it."""
    where = rel if rel == f"{name}/{METADATA}" else f"array {name}: chunk {rel[len(name) + 1 :]}"
    return CheckpointError(f"checkpoint damaged: {path}: {where} {msg}")


def _check(
    path: Path, rel: str, name: str, files: Mapping[str, FileDigest] | None, size: int, digest: str, algorithm: str
) -> None:
    """Raise CheckpointError unless the file `rel` (of array `name`), read as `size` bytes of sha256
    `digest`, is as the marker's `files` records it (no `files`: an older marker, nothing to compare)."""
    expected = None if files is None else files.get(rel)
    if expected is None:
        return
    if size != expected[0]:
        raise _damaged(path, rel, name, f"has {size} bytes, the {MARKER} marker records {expected[0]}")
    if digest != expected[1]:
        raise _damaged(path, rel, name, changed(algorithm))


def raw_array(
    path: Path, name: str, files: Mapping[str, FileDigest] | None, algorithm: str = ALGORITHM
) -> RawArray | None:
    """Array `name` of the checkpoint at `path` if this module can read it (uncompressed, regular chunks,
    default chunk keys), else None (zarr-python reads it); its zarr.json checked against `files`."""
    rel = f"{name}/{METADATA}"
    try:
        data = (path / rel).read_bytes()
    except FileNotFoundError:
        raise _damaged(path, rel, name, "is missing") from None
    h = hasher(algorithm)
    h.update(data)
    _check(path, rel, name, files, len(data), h.hexdigest(), algorithm)
    meta = json.loads(data)
    codecs = meta.get("codecs")
    if (
        meta.get("zarr_format") != 3
        or meta.get("node_type") != "array"
        or meta.get("chunk_grid", {}).get("name") != "regular"
        or meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
        or not isinstance(codecs, list)
        or len(codecs) != 1
        or codecs[0].get("name") != "bytes"
        or codecs[0].get("configuration", {"endian": "little"}) != {"endian": "little"}
        or meta.get("storage_transformers", [])
    ):
        return None
    try:
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    except TypeError:
        return None
    chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    return RawArray(name, tuple(meta["shape"]), dtype, chunks)


def _bounds(selection: Selection, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    if selection is Ellipsis:
        return tuple((0, s) for s in shape)
    out = []
    for sl, n in zip(selection, shape, strict=True):
        start, stop, step = sl.indices(n)
        assert step == 1, "checkpoints read rectangles"
        out.append((start, max(start, stop)))
    return tuple(out)


def _read_file(
    path: Path,
    rel: str,
    name: str,
    targets: Sequence[memoryview],
    files: Mapping[str, FileDigest] | None,
    algorithm: str,
) -> None:
    """Read the file `rel` (a chunk of array `name`) into `targets` one after the other, hashing each
    block as it arrives; raise CheckpointError if it is missing, of another size, or changed."""
    want = sum(t.nbytes for t in targets)
    try:
        f = open(path / rel, "rb", buffering=0)  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise _damaged(path, rel, name, "is missing") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        expected = None if files is None else files.get(rel)
        if expected is not None and size != expected[0]:
            raise _damaged(path, rel, name, f"has {size} bytes, the {MARKER} marker records {expected[0]}")
        if size != want:
            raise _damaged(path, rel, name, f"has {size} bytes, its array's chunk has {want}")
        h = hasher(algorithm)
        for target in targets:
            mv = target.cast("B") if target.format != "B" or target.ndim != 1 else target
            while mv:
                n = f.readinto(mv[:_BLOCK])
                if not n:
                    raise _damaged(path, rel, name, f"ended early (read while it was {size} bytes)")
                h.update(mv[:n])
                mv = mv[n:]
    _check(path, rel, name, files, size, h.hexdigest(), algorithm)


def _chunk_reads(
    path: Path, arr: RawArray, selection: Selection, files: Mapping[str, FileDigest] | None, algorithm: str
) -> tuple[np.ndarray[Any, Any], list[Callable[[], None]]]:
    """The destination of reading `selection` of `arr`, and one call per chunk it touches that fills it:
    straight into the destination where the chunk's part is contiguous there (a slab along dim 0 of a
    whole-width read), else into a scratch chunk copied from."""
    bounds = _bounds(selection, arr.shape)
    out: np.ndarray[Any, Any] = np.empty(tuple(b - a for a, b in bounds), arr.dtype)
    if out.size == 0:
        return out, []
    ranges = [range(a // c, math.ceil(b / c)) for (a, b), c in zip(bounds, arr.chunks, strict=True)]
    whole_rows = all(b - a == n == c for (a, b), n, c in zip(bounds[1:], arr.shape[1:], arr.chunks[1:], strict=True))
    calls: list[Callable[[], None]] = []
    for coords in itertools.product(*ranges):
        rel = f"{arr.name}/{chunk_key(coords)}"
        lo = [i * c for i, c in zip(coords, arr.chunks, strict=True)]
        part = tuple(
            slice(max(a, l0) - a, min(b, l0 + c) - a) for (a, b), l0, c in zip(bounds, lo, arr.chunks, strict=True)
        )
        # The chunk's rows all lie inside the read (its padding beyond the array's end aside).
        inside = out.ndim > 0 and bounds[0][0] <= lo[0] and bounds[0][1] >= min(lo[0] + arr.chunks[0], arr.shape[0])
        if whole_rows and inside:
            rows = part[0].stop - part[0].start
            pad = (arr.chunks[0] - rows) * math.prod(arr.chunks[1:]) * arr.dtype.itemsize
            dest = out[part[0]].reshape(-1).view(np.uint8).data
            targets = [dest] if not pad else [dest, np.empty(pad, np.uint8).data]
            calls.append(functools.partial(_read_file, path, rel, arr.name, targets, files, algorithm))
        else:

            def scratch(rel: str = rel, part: tuple[slice, ...] = part, lo: list[int] = lo) -> None:
                chunk = np.empty(arr.chunks, arr.dtype)
                _read_file(path, rel, arr.name, [chunk.reshape(-1).view(np.uint8).data], files, algorithm)
                src = tuple(
                    slice(p.start + a - l0, p.stop + a - l0) for p, (a, _), l0 in zip(part, bounds, lo, strict=True)
                )
                out[part] = chunk[src]

            calls.append(scratch)
    return out, calls


def read_raw(
    path: Path,
    wanted: Sequence[tuple[RawArray, Selection]],
    files: Mapping[str, FileDigest] | None,
    algorithm: str = ALGORITHM,
) -> list[np.ndarray[Any, Any]]:
    """The (part of the) uncompressed arrays `wanted`, every chunk read on THREADS threads straight into
    its destination and checked against the marker's `files` as it is read (CheckpointError naming the
    checkpoint, the array and the chunk: a missing chunk is damage, never zeros)."""
    outs, calls = [], []
    for arr, selection in wanted:
        out, mine = _chunk_reads(Path(path), arr, selection, files, algorithm)
        outs.append(out)
        calls += mine
    _run_all(lambda call: call(), [(c,) for c in calls])
    return outs


async def read_arrays(path: Path, wanted: list[tuple[str, Selection]], store: Any = None) -> list[np.ndarray[Any, Any]]:
    """The (part of the) arrays `wanted` read by zarr-python (compressed ones): (name, what to read of it),
    read through `store` (default: a read-only LocalStore at `path`; a load passes
    trinity.store.checkpoint_integrity's, which checks)."""
    store = LocalStore(str(path), read_only=True) if store is None else store
    root = await za.open_group(store=store, mode="r")
    sem = asyncio.Semaphore(_CONCURRENT_ARRAYS)

    async def one(name: str, selection: Selection) -> np.ndarray[Any, Any]:
        async with sem:
            arr = await root.getitem(name)
            assert isinstance(arr, AsyncArray)
            return np.asarray(await arr.getitem(selection))

    return list(await asyncio.gather(*(one(n, sel) for n, sel in wanted)))
