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
would not be exact). Arrays are written and read up to 16 at a time.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal

import numpy as np
import zarr
import zarr.api.asynchronous as za
from zarr import AsyncArray
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore

from trinity.store.checkpoint_commit import WRITER_ATTR, writer_record

ATTR = "trinity_checkpoint"
FORMAT = 1
CHUNK_BYTES = 128 * 1024 * 1024  # arrays up to this size are one chunk; larger ones are split along dim 0
_CONCURRENT_ARRAYS = 16

Compression = Literal["none", "zstd", "lz4"]
Selection = tuple[slice, ...] | EllipsisType
"""What to read of an array: Ellipsis for all of it, or one rectangle."""


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


# --------------------------------------------------------------------------------------------
# Writing


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


async def write_array(root: Any, name: str, arr: np.ndarray[Any, Any], compressors: Any) -> None:
    """One Zarr array under `root`. (A module-level function so tests can make it fail or stall.)"""
    z = await root.create_array(
        name,
        shape=arr.shape,
        dtype=arr.dtype,
        chunks=array_chunks(arr.shape, arr.itemsize),
        compressors=compressors,
        config={"write_empty_chunks": True},
    )
    await z.setitem(Ellipsis, arr)


async def write_arrays(root: Any, arrays: list[tuple[str, np.ndarray[Any, Any]]], compressors: Any) -> None:
    """Every (name, array) of `arrays` under `root`; on a failure, the ones started finish, then it raises."""
    sem = asyncio.Semaphore(_CONCURRENT_ARRAYS)
    failed = False

    async def one(name: str, arr: np.ndarray[Any, Any]) -> None:
        nonlocal failed
        async with sem:
            if failed:
                return
            try:
                await write_array(root, name, arr, compressors)
            except BaseException:
                failed = True
                raise

    # No cancellation on the first error: let in-flight writes finish (a cancelled task's thread
    # would keep writing), start no new ones, then raise, so the caller removes a quiet folder.
    results = await asyncio.gather(*(one(n, a) for n, a in arrays), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


# --------------------------------------------------------------------------------------------
# Reading


def read_attrs(path: Path) -> dict[str, Any]:
    """The checkpoint attribute of the group at `path`; a ValueError if it is not one of FORMAT."""
    group = zarr.open_group(store=LocalStore(str(path), read_only=True), mode="r")
    attrs = group.attrs.asdict().get(ATTR)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trinity checkpoint of format {FORMAT}")
    return attrs


async def read_arrays(path: Path, wanted: list[tuple[str, Selection]], store: Any = None) -> list[np.ndarray[Any, Any]]:
    """The (part of the) arrays `wanted`: (name, what to read of it), read through `store` (default: a
    read-only LocalStore at `path`; a load passes trinity.store.checkpoint_integrity's, which checks)."""
    store = LocalStore(str(path), read_only=True) if store is None else store
    root = await za.open_group(store=store, mode="r")
    sem = asyncio.Semaphore(_CONCURRENT_ARRAYS)

    async def one(name: str, selection: Selection) -> np.ndarray[Any, Any]:
        async with sem:
            arr = await root.getitem(name)
            assert isinstance(arr, AsyncArray)
            return np.asarray(await arr.getitem(selection))

    return list(await asyncio.gather(*(one(n, sel) for n, sel in wanted)))
