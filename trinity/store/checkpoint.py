"""Checkpoints in Zarr: written aside, committed atomically, pruned without ever losing the last one.

Layout of one checkpoint (a Zarr v3 group):

    ckpt_root/step-00000100/
      zarr.json            root group: attribute `trinity_writer` = {host, pid} written first,
                           attribute `trinity_checkpoint` = {format, step, meta, skeleton,
                           leaves} written LAST (see trinity.store.tree)
      model/<name>         one array per large tensor, e.g. model/layers.0.attn.wq.weight
      optimizer/state.3.exp_avg ...
      %packed              every leaf under `pack_below_bytes` (1 MiB), concatenated as bytes: one
                           array instead of hundreds of small ones (zarr costs milliseconds per array)
      COMMITTED            the commit marker: {step, time, n_arrays, n_leaves, nbytes, skeleton_sha256}
                           (a plain file: zarr's member listing warns that it is not a Zarr node)

Protocol (a checkpoint without its marker does not exist):
1. write everything into ckpt_root/.tmp-step-00000100-<pid>/, arrays first, the skeleton
   attribute last; fsync every file and the folder;
2. os.rename the folder to step-00000100 (atomic), fsync ckpt_root;
3. write COMMITTED (fsync the file and the folder);
4. prune: committed checkpoints beyond `keep_last` (never the newest committed), marker-less
   step folders and .tmp folders of writers that are gone (same host: pid not alive; another
   host: untouched for `stale_after_s`). Deletion removes the marker first.
A failure in 1 removes the temporary folder; earlier checkpoints are never touched before 3.

bfloat16 (and other dtypes numpy lacks, e.g. float8) are stored as their unsigned-integer bit
pattern of the same width, with the torch dtype recorded, so every round trip is bit-exact.

Many ranks (torch.distributed, FSDP2/HSDP, expert parallelism): save_checkpoint is then a
collective (trinity.store.checkpoint_dist). The checkpoint has the same layout: a DTensor leaf is
one array of its global shape, chunked so that each rank's piece is one chunk written by that rank
alone (trinity.store.shards); the skeleton attribute also records `layout` = {world_size, per
DTensor leaf: mesh shape, mesh dim names, placements, chunks} (read_checkpoint_layout). Loading
needs no collective: without `like` every leaf is whole; with `like` (the state dicts of the job
that loads, on any number of ranks) each DTensor leaf comes back in that layout, each rank reading
only its own rectangle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import zarr
import zarr.api.asynchronous as za
from torch.distributed.tensor import DTensor
from zarr import AsyncArray
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from trinity.store import shards
from trinity.store.tree import Leaf, flatten, leaf_targets, unflatten

MARKER = "COMMITTED"
WRITER_ATTR = "trinity_writer"
ATTR = "trinity_checkpoint"
PACKED = "%packed"
FORMAT = 1
PACK_BELOW_BYTES = 1024 * 1024
CHUNK_BYTES = 128 * 1024 * 1024  # arrays up to this size are one chunk; larger ones are split along dim 0
_PACK_ALIGN = 64
_CONCURRENT_ARRAYS = 16

Compression = Literal["none", "zstd", "lz4"]

_STEP_RE = re.compile(r"^step-(\d{8,})$")
_SCRATCH_RE = re.compile(r"^\.(?:tmp|trash)-step-(\d+)-(\d+)$")
# Folders this process is writing right now: never stale, whatever their pid says.
_active: set[Path] = set()
_active_lock = threading.Lock()

_NUMPY_DTYPES = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
}  # fmt: skip
_BITS_AS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# --------------------------------------------------------------------------------------------
# Leaves <-> numpy


def _stored_array(leaf: Leaf) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    """(numpy array to store, its leaf record) — no copy for a contiguous CPU tensor."""
    v = leaf.value
    if isinstance(v, torch.Tensor):
        t = v.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if t.dtype not in _NUMPY_DTYPES:  # bfloat16, float8_*: keep the bit pattern
            t = t.view(_BITS_AS[t.element_size()])
        arr = t.numpy()
        return arr, {"kind": "tensor", "dtype": dtype, "shape": list(v.shape), "stored": arr.dtype.str}
    arr = v if v.flags.c_contiguous else v.copy(order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
    return arr, {"kind": "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape), "stored": arr.dtype.str}


def _stored_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype a tensor of `dtype` is stored as (its bit pattern where numpy lacks it)."""
    if dtype not in _NUMPY_DTYPES:
        dtype = _BITS_AS[torch.empty((), dtype=dtype).element_size()]
    return torch.empty(0, dtype=dtype).numpy().dtype


def _as_tensor(arr: np.ndarray[Any, Any], rec: dict[str, Any]) -> torch.Tensor:
    t = torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))
    dtype = getattr(torch, rec["dtype"])
    return t.view(dtype) if t.dtype != dtype else t


def _leaf_value(arr: np.ndarray[Any, Any], rec: dict[str, Any], map_location: str | torch.device | None) -> Any:
    arr = np.asarray(arr).reshape(tuple(rec["shape"]))
    if rec["kind"] == "ndarray":
        return arr.astype(np.dtype(rec["dtype"]), copy=False)
    t = _as_tensor(arr, rec)
    return t if map_location is None else t.to(map_location)


def _whole_in_one_process(leaf: Leaf) -> Leaf:
    """A leaf for a single-process save: a DTensor on a one-rank mesh becomes its full tensor."""
    v = leaf.value
    if not shards.is_dtensor(v):
        return leaf
    if v.device_mesh.size() != 1:
        raise ValueError(
            f"{leaf.path}: a DTensor on a mesh of {v.device_mesh.size()} ranks needs a collective save: call "
            f"save_checkpoint on every rank (distributed=None or True), not on one"
        )
    return Leaf(leaf.path, v.full_tensor())


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One chunk up to CHUNK_BYTES; beyond, equal slabs along dim 0 (little padding in the last)."""
    whole = tuple(max(1, s) for s in shape)
    nbytes = math.prod(shape) * itemsize
    if nbytes <= CHUNK_BYTES or shape[0] <= 1:
        return whole
    n = math.ceil(nbytes / (CHUNK_BYTES // 2))
    return (math.ceil(shape[0] / n), *whole[1:])


def _compressors(compression: Compression) -> Any:
    if compression == "none":
        return None
    if compression == "zstd":
        return ZstdCodec(level=1)
    return BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")


# --------------------------------------------------------------------------------------------
# Writing


async def _write_array(root: Any, name: str, arr: np.ndarray[Any, Any], compressors: Any) -> None:
    """One Zarr array under `root`. (A module-level function so tests can make it fail or stall.)"""
    z = await root.create_array(
        name,
        shape=arr.shape,
        dtype=arr.dtype,
        chunks=_chunks(arr.shape, arr.itemsize),
        compressors=compressors,
        # Write chunks that equal the fill value too: -0.0 == 0.0, so skipping them is not exact.
        config={"write_empty_chunks": True},
    )
    await z.setitem(Ellipsis, arr)


async def _write_arrays(root: Any, arrays: list[tuple[str, np.ndarray[Any, Any]]], compressors: Any) -> None:
    sem = asyncio.Semaphore(_CONCURRENT_ARRAYS)
    failed = False

    async def one(name: str, arr: np.ndarray[Any, Any]) -> None:
        nonlocal failed
        async with sem:
            if failed:
                return
            try:
                await _write_array(root, name, arr, compressors)
            except BaseException:
                failed = True
                raise

    # No cancellation on the first error: let in-flight writes finish (a cancelled task's thread
    # would keep writing), start no new ones, then raise, so the caller removes a quiet folder.
    results = await asyncio.gather(*(one(n, a) for n, a in arrays), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def _create_root(folder: Path) -> Any:
    writer = {"host": socket.gethostname(), "pid": os.getpid()}  # first, so pruning can tell if we are alive
    return await za.create_group(store=LocalStore(str(folder)), attributes={WRITER_ATTR: writer}, zarr_format=3)


async def _write_group(
    folder: Path, arrays: list[tuple[str, np.ndarray[Any, Any]]], attrs: dict[str, Any], compression: Compression
) -> None:
    root = await _create_root(folder)
    await _write_arrays(root, arrays, _compressors(compression))
    await root.update_attributes({ATTR: attrs})  # metadata last


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder, topdown=False):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def _write_json_durable(path: Path, value: Any) -> None:
    """Write, fsync, rename into place, fsync the folder: the file is whole or absent, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _skeleton_digest(skeleton: Any, leaves: Any) -> str:
    return hashlib.sha256(json.dumps([skeleton, leaves], sort_keys=True).encode()).hexdigest()


class _Packer:
    """Small leaves concatenated into one byte array (each at a 64-byte aligned offset)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray[Any, Any]] = []
        self.offset = 0

    def add(self, arr: np.ndarray[Any, Any]) -> list[int]:
        pad = -self.offset % _PACK_ALIGN
        if pad:
            self.parts.append(np.zeros(pad, np.uint8))
        self.offset += pad
        self.parts.append(arr.reshape(-1).view(np.uint8))
        where = [self.offset, arr.nbytes]
        self.offset += arr.nbytes
        return where

    def arrays(self) -> list[tuple[str, np.ndarray[Any, Any]]]:
        return [(PACKED, np.concatenate(self.parts))] if self.parts else []


def _summary(skeleton: Any, records: list[dict[str, Any]], n_arrays: int, nbytes: int) -> dict[str, Any]:
    return {
        "n_arrays": n_arrays,
        "n_leaves": len(records),
        "nbytes": nbytes,
        "skeleton_sha256": _skeleton_digest(skeleton, records),
    }


def write_tree(
    folder: Path,
    state: Any,
    meta: dict[str, Any] | None = None,
    *,
    step: int | None = None,
    compression: Compression = "none",
    pack_below_bytes: int = PACK_BELOW_BYTES,
    fsync: bool = True,
) -> dict[str, Any]:
    """Write `state` as a new Zarr group at `folder` (which must not exist); return the summary for the marker."""
    skeleton, leaves = flatten(state)
    arrays: list[tuple[str, np.ndarray[Any, Any]]] = []
    records: list[dict[str, Any]] = []
    packer = _Packer()
    for leaf in leaves:
        arr, rec = _stored_array(_whole_in_one_process(leaf))
        if arr.nbytes < pack_below_bytes:
            rec["packed"] = packer.add(arr)
        else:
            arrays.append((leaf.path, arr))
            rec["array"] = leaf.path
        records.append(rec)
    arrays += packer.arrays()
    attrs = {"format": FORMAT, "step": step, "meta": meta or {}, "skeleton": skeleton, "leaves": records}
    folder.mkdir(parents=True)
    sync(_write_group(folder, arrays, attrs, compression))
    if fsync:
        _fsync_tree(folder)
    return _summary(skeleton, records, len(arrays), int(sum(a.nbytes for _, a in arrays)))


@contextlib.contextmanager
def _claimed(folder: Path) -> Iterator[None]:
    with _active_lock:
        _active.add(folder)
    try:
        yield
    finally:
        with _active_lock:
            _active.discard(folder)


def _commit(ckpt_root: Path, step: int, tmp: Path, summary: dict[str, Any]) -> Path:
    """Rename the finished `tmp` to its step folder and write the marker (steps 2 and 3 of the protocol)."""
    final = ckpt_root / checkpoint_name(step)
    trash: Path | None = None
    if final.exists():
        # Same step again (e.g. the final save lands on a periodic one). A committed copy is moved
        # aside and deleted after the new commit; a crash in between leaves the previous step as latest.
        trash = ckpt_root / f".trash-{checkpoint_name(step)}-{os.getpid()}"
        _unmark(final)
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_path(ckpt_root)
    _write_json_durable(final / MARKER, {"step": step, "time": time.time(), **summary})
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def save_checkpoint(
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
    distributed: bool | None = None,
) -> Path:
    """Write and commit ckpt_root/step-{step:08d}; then keep the `keep_last` newest (keep_last <= 0: all).

    `state` is any nesting of dicts/lists/tuples of tensors, numpy arrays and Python scalars
    (see trinity.store.tree). `meta` (JSON) is stored in the checkpoint and returned by
    `read_checkpoint_meta`. An exception while writing leaves no trace: the temporary folder is
    removed and the earlier checkpoints are untouched.

    With torch.distributed initialised and more than one rank (or `distributed=True`), this is a
    collective: every rank calls it with its own tree (same structure; DTensor leaves hold each
    rank's piece, every other leaf is the same on all ranks) and gets the same path back; see
    `trinity.store.checkpoint_dist`. `distributed=False` saves from the calling process alone.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        from trinity.store.checkpoint_dist import save_collective  # it builds on this module

        return save_collective(
            Path(ckpt_root), step, state, keep_last, meta, compression=compression,
            pack_below_bytes=pack_below_bytes, fsync=fsync, stale_after_s=stale_after_s,
        )  # fmt: skip
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    with _claimed(tmp), _claimed(final):
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            summary = write_tree(
                tmp, state, meta, step=step, compression=compression, pack_below_bytes=pack_below_bytes, fsync=fsync
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _commit(ckpt_root, step, tmp, summary)
    prune_checkpoints(ckpt_root, keep_last, stale_after_s=stale_after_s)
    return final


# --------------------------------------------------------------------------------------------
# Finding, pruning


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, committed) of every step-* folder, oldest first; temporary folders are not listed."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p, (p / MARKER).is_file()))
    return sorted(out, key=lambda e: e[0])


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest committed checkpoint, or None."""
    committed = [p for _, p, ok in list_checkpoints(ckpt_root) if ok]
    return committed[-1] if committed else None


def _unmark(folder: Path) -> None:
    """Uncommit first, so a deletion cut short never leaves a committed, half-deleted checkpoint."""
    (folder / MARKER).unlink(missing_ok=True)
    _fsync_path(folder)


def _writer_gone(folder: Path, pid_hint: int | None, stale_after_s: float) -> bool:
    """Whether the process that wrote `folder` is finished (so the folder is garbage)."""
    with _active_lock:
        if folder in _active:
            return False
    host: str
    pid: int | None
    try:
        writer = json.loads((folder / "zarr.json").read_text())["attributes"][WRITER_ATTR]
        host, pid = str(writer["host"]), int(writer["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        host, pid = socket.gethostname(), pid_hint
    if host == socket.gethostname() and pid is not None:
        if pid == os.getpid():
            return True  # ours, but not being written now (checked above)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
        else:
            return False
    # Another host (shared file system), or no way to tell: judge by the last write inside.
    newest = max((Path(d).stat().st_mtime for d, _, _ in os.walk(folder)), default=0.0)
    for d, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                newest = max(newest, (Path(d) / f).stat().st_mtime)
    return time.time() - newest > stale_after_s


def prune_checkpoints(ckpt_root: Path, keep_last: int, *, stale_after_s: float = 3600.0) -> list[Path]:
    """Delete committed checkpoints beyond the `keep_last` newest (never the newest; keep_last <= 0
    keeps all), and leftovers of writers that are gone. Returns what was deleted."""
    root = Path(ckpt_root)
    removed: list[Path] = []
    entries = list_checkpoints(root)
    committed = [p for _, p, ok in entries if ok]
    doomed = committed[: -max(1, keep_last)] if keep_last > 0 else []
    for p in doomed:
        _unmark(p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for _, p, ok in entries:
        if not ok and _writer_gone(p, None, stale_after_s):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if root.is_dir():
        for p in root.iterdir():
            m = _SCRATCH_RE.match(p.name)
            if m and p.is_dir() and _writer_gone(p, int(m.group(2)), stale_after_s):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------
# Loading


def read_marker(path: Path) -> dict[str, Any]:
    """The commit marker of a checkpoint; a clear error if it has none (it does not exist)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(
            f"{path} is not a committed checkpoint (no {MARKER} marker: it was cut short while being "
            f"written). Use trinity.store.checkpoint.latest_checkpoint() to find the newest committed one."
        )
    value = json.loads(marker.read_text())
    assert isinstance(value, dict)
    return value


def _read_attrs(path: Path) -> dict[str, Any]:
    group = zarr.open_group(store=LocalStore(str(path), read_only=True), mode="r")
    attrs = group.attrs.asdict().get(ATTR)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trinity checkpoint of format {FORMAT}")
    return attrs


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The `meta` given to save_checkpoint, plus `step`."""
    read_marker(path)
    attrs = _read_attrs(Path(path))
    return {"step": attrs["step"], **attrs["meta"]}


Selection = tuple[slice, ...] | EllipsisType


async def _read_arrays(path: Path, wanted: list[tuple[str, Selection]]) -> list[np.ndarray[Any, Any]]:
    """The (part of the) arrays `wanted`: (name, Ellipsis for all of it, or one rectangle)."""
    root = await za.open_group(store=LocalStore(str(path), read_only=True), mode="r")
    sem = asyncio.Semaphore(_CONCURRENT_ARRAYS)

    async def one(name: str, selection: Selection) -> np.ndarray[Any, Any]:
        async with sem:
            arr = await root.getitem(name)
            assert isinstance(arr, AsyncArray)
            return np.asarray(await arr.getitem(selection))

    return list(await asyncio.gather(*(one(n, sel) for n, sel in wanted)))


def load_checkpoint(path: Path, *, like: Any = None, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """The state given to save_checkpoint, rebuilt exactly (tensors on CPU unless `map_location`).

    Without `like`, every leaf comes back whole: a DTensor saved by many ranks is a plain tensor of
    its global shape. `like` is (part of) a tree of the same structure in the layout wanted now,
    e.g. {"model": model.state_dict(), "optimizer": optimizer.state_dict()} of an M-rank job: each
    leaf that is a DTensor there comes back as a DTensor with that mesh and those placements (on its
    local tensor's device, with the stored dtype), and this rank reads only its own rectangle of the
    stored array. This needs no collective: each rank may load on its own. Leaves `like` lacks, or
    holds as plain values, come back as without `like`.
    """
    path = Path(path)
    marker = read_marker(path)
    attrs = _read_attrs(path)
    skeleton, records = attrs["skeleton"], attrs["leaves"]
    if _skeleton_digest(skeleton, records) != marker.get("skeleton_sha256"):
        raise ValueError(f"{path}: the skeleton does not match its {MARKER} marker; the checkpoint is corrupt")
    # Leaf index -> (its key path, the DTensor of the target layout, the rectangle this rank reads).
    targets: dict[int, tuple[str, DTensor, tuple[slice, ...]]] = {}
    if like is not None:
        for i, (where, ref) in leaf_targets(skeleton, like).items():
            if shards.is_dtensor(ref):
                if records[i]["kind"] != "tensor":
                    raise ValueError(f"{path}: {where} is stored as a numpy array; it cannot be loaded as a DTensor")
                targets[i] = (where, ref, shards.region_of(where, tuple(records[i]["shape"]), ref))
    wanted: list[tuple[str, Selection]] = []
    for i, rec in enumerate(records):
        if "array" in rec:
            wanted.append((rec["array"], targets[i][2] if i in targets else ...))
    if any("packed" in r for r in records):
        wanted.append((PACKED, ...))
    arrays = dict(zip([n for n, _ in wanted], sync(_read_arrays(path, wanted)), strict=True))
    leaves: list[Any] = []
    for i, rec in enumerate(records):
        if "packed" in rec:
            off, n = rec["packed"]
            raw = arrays[PACKED][off : off + n].copy()
            arr = raw.view(np.dtype(rec["stored"])).reshape(tuple(rec["shape"]))
            if i in targets:
                arr = arr[targets[i][2]]
        else:
            arr = arrays[rec["array"]]
        if i in targets:
            leaves.append(shards.as_dtensor(_as_tensor(np.asarray(arr), rec), targets[i][1]))
        else:
            leaves.append(_leaf_value(arr, rec, map_location))
    state = unflatten(skeleton, leaves)
    assert isinstance(state, dict)
    return state


def read_checkpoint_layout(path: Path) -> dict[str, Any]:
    """How the checkpoint was written: {"world_size": N, "dtensors": {leaf path: {"mesh_shape",
    "mesh_dim_names", "placements" (e.g. ["R", "S(0)"]), "chunks" (None for a small, packed one)}}}.
    A single-process save reads as {"world_size": 1, "dtensors": {}}."""
    read_marker(path)
    layout = _read_attrs(Path(path)).get("layout", {"world_size": 1, "dtensors": {}})
    assert isinstance(layout, dict)
    return layout
