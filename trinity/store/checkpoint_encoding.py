"""How one leaf of a checkpoint (a tensor or a numpy array) is stored: its numpy array and its record.

Every leaf of the state tree (trinity.store.tree) becomes a numpy array to write and a JSON record
in the skeleton attribute that says how to read it back:

    {"kind": "tensor" | "ndarray", "dtype": "bfloat16" | "<f4" ..., "shape": [...],
     "stored": the numpy dtype of the stored array, e.g. "<u2",
     and where it lies: "array": its own Zarr array, or "packed": [offset, nbytes] in %packed}

bfloat16 (and other dtypes numpy lacks, e.g. float8) are stored as their unsigned-integer bit
pattern of the same width, with the torch dtype recorded, so every round trip is bit-exact.

A leaf of `pack_below_bytes` or more is its own array, named by its storage path; the smaller ones
are concatenated as bytes into one array, %packed, each at a 64-byte aligned offset: one array (a few
chunk files) instead of hundreds of small ones. Every array costs files and folders (its zarr.json,
its chunk files, the folders of its name and chunk keys), and on a real file system it is those,
created and fsynced, that make a checkpoint of many small arrays slower than one torch.save file:
the medium benchmark state (586 tensors, 616 MB) was ~300 files and ~450 folders at 1 MiB and is
~20 files at 8 MiB (bench/README.md, "Checkpoints"). So a single-process save packs below
PACK_BELOW_BYTES_ONE_PROCESS (8 MiB). A collective save keeps PACK_BELOW_BYTES (1 MiB): there a
packed DTensor is gathered to rank 0 and every rank reads all of %packed when it loads, so only the
truly small ones (norms, biases) are worth it; the large tensors of a large model are their own
arrays either way.

%packed is written from the leaves' own memory (`PackedBytes`: the parts in order, never copied
together), each chunk file by its own thread.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import torch

PACKED = "%packed"
PACK_BELOW_BYTES = 1024 * 1024
"""Leaves smaller than this are packed into %packed in a collective save (see above)."""
PACK_BELOW_BYTES_ONE_PROCESS = 8 * 1024 * 1024
"""Leaves smaller than this are packed into %packed in a single-process save (see above)."""
PACK_ALIGN = 64

NUMPY_DTYPES = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
}  # fmt: skip
"""The torch dtypes numpy has; any other is stored as its bit pattern (BITS_AS)."""
BITS_AS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}
"""Element size in bytes -> the unsigned integer dtype that holds its bit pattern."""


def stored_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype a tensor of `dtype` is stored as (its bit pattern where numpy lacks it)."""
    if dtype not in NUMPY_DTYPES:
        dtype = BITS_AS[torch.empty((), dtype=dtype).element_size()]
    return torch.empty(0, dtype=dtype).numpy().dtype


def tensor_record(dtype: torch.dtype, shape: tuple[int, ...] | torch.Size, stored: np.dtype[Any]) -> dict[str, Any]:
    """The record of a tensor leaf, before it says where its data lies."""
    return {"kind": "tensor", "dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "stored": stored.str}


def stored_array(value: torch.Tensor | np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    """(numpy array to store, its leaf record) — no copy for a contiguous CPU tensor."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype not in NUMPY_DTYPES:  # bfloat16, float8_*: keep the bit pattern
            t = t.view(BITS_AS[t.element_size()])
        arr = t.numpy()
        return arr, tensor_record(value.dtype, value.shape, arr.dtype)
    arr = value if value.flags.c_contiguous else value.copy(order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
    return arr, {"kind": "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape), "stored": arr.dtype.str}


def as_tensor(arr: np.ndarray[Any, Any], rec: dict[str, Any]) -> torch.Tensor:
    """The stored array of a tensor leaf as a tensor of its recorded dtype (on CPU)."""
    t = torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))
    dtype = getattr(torch, rec["dtype"])
    return t.view(dtype) if t.dtype != dtype else t


def leaf_value(arr: np.ndarray[Any, Any], rec: dict[str, Any], map_location: str | torch.device | None) -> Any:
    """The leaf `rec` describes, whole, from its stored array."""
    arr = np.asarray(arr).reshape(tuple(rec["shape"]))
    if rec["kind"] == "ndarray":
        return arr.astype(np.dtype(rec["dtype"]), copy=False)
    t = as_tensor(arr, rec)
    return t if map_location is None else t.to(map_location)


def unpacked(packed: np.ndarray[Any, Any], rec: dict[str, Any]) -> np.ndarray[Any, Any]:
    """The stored array of a packed leaf, cut out of the %packed bytes: a view when %packed is writable
    (as a load reads it: fresh memory, each leaf at a 64-byte aligned offset) and aligned, else a copy."""
    offset, nbytes = rec["packed"]
    raw = packed[offset : offset + nbytes]
    if not raw.flags.writeable or raw.ctypes.data % np.dtype(rec["stored"]).alignment:
        raw = raw.copy()
    arr: np.ndarray[Any, Any] = raw.view(np.dtype(rec["stored"])).reshape(tuple(rec["shape"]))
    return arr


class PackedBytes:
    """The bytes of %packed: the packed leaves' uint8 views and their alignment pads, in order, as one
    uint8 array would hold them, without copying them together (`concatenated` does, for zarr-python)."""

    def __init__(self, parts: list[np.ndarray[Any, Any]]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *(p.nbytes for p in parts)]).tolist()
        self.nbytes: int = self.starts[-1]
        self.shape = (self.nbytes,)
        self.dtype = np.dtype(np.uint8)
        self.itemsize = 1

    def byte_range(self, start: int, stop: int) -> list[memoryview]:
        """Views of the bytes [start, stop), in order (stop <= nbytes)."""
        out = []
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while start < stop and i < len(self.parts):
            lo, hi = self.starts[i], self.starts[i + 1]
            if hi > start:
                out.append(self.parts[i].data.cast("B")[start - lo : min(stop, hi) - lo])
                start = min(stop, hi)
            i += 1
        return out

    def concatenated(self) -> np.ndarray[Any, Any]:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint8)


StoredArray = np.ndarray[Any, Any] | PackedBytes
"""What an array of a checkpoint is written from: a leaf's numpy array, or the packed leaves' bytes."""


class StoredLeaves:
    """The leaf records of a checkpoint being written, in leaf order, and the arrays that hold them."""

    def __init__(self, pack_below_bytes: int) -> None:
        self.pack_below_bytes = pack_below_bytes
        self.records: list[dict[str, Any]] = []
        self._whole: list[tuple[str, np.ndarray[Any, Any]]] = []
        self._packed: list[np.ndarray[Any, Any]] = []
        self._offset = 0

    def add(self, path: str, value: torch.Tensor | np.ndarray[Any, Any]) -> None:
        """A leaf whose data is written with the others: as its own array at `path`, or packed."""
        arr, rec = stored_array(value)
        if arr.nbytes < self.pack_below_bytes:
            rec["packed"] = self._pack(arr)
        else:
            self._whole.append((path, arr))
            rec["array"] = path
        self.records.append(rec)

    def add_record(self, rec: dict[str, Any]) -> None:
        """A leaf whose array is written elsewhere (the pieces of a DTensor, by their ranks)."""
        self.records.append(rec)

    def _pack(self, arr: np.ndarray[Any, Any]) -> list[int]:
        pad = -self._offset % PACK_ALIGN
        if pad:
            self._packed.append(np.zeros(pad, np.uint8))
        self._offset += pad
        self._packed.append(arr.reshape(-1).view(np.uint8))
        where = [self._offset, arr.nbytes]
        self._offset += arr.nbytes
        return where

    def arrays(self) -> list[tuple[str, StoredArray]]:
        """(name, array) of every array to write: %packed first if any leaf is packed (its chunks are the
        most work), then the whole leaves."""
        packed: list[tuple[str, StoredArray]] = [(PACKED, PackedBytes(self._packed))] if self._packed else []
        return packed + list(self._whole)
