"""The files trinity writes itself are the Zarr v3 files zarr-python writes and reads.

trinity.store.checkpoint_zarr writes uncompressed arrays (zarr.json and raw chunk files) with its
own code and reads them straight into their destination; zarr-python is the independent reference:
it must read every array of a checkpoint back bit for bit (bf16 as its uint16 bits), write the very
same bytes for the same array, and its own files must load through trinity's reader.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

import trinity.store.checkpoint_zarr as ckpt_zarr
from trinity.store.checkpoint import load_checkpoint, save_checkpoint
from trinity.store.checkpoint_commit import MARKER, read_marker
from trinity.store.checkpoint_encoding import PACKED, stored_array
from trinity.store.checkpoint_zarr import Compression, array_chunks, raw_array, read_attrs, read_raw
from trinity.store.tree import flatten


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_zarr, "CHUNK_BYTES", 8 * 1024)  # big arrays split into slabs along dim 0


def state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(101, 33, generator=g)
    w.view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")])
    return {
        "model": {
            "w": w,  # 4 slabs of 26 rows, the last one padded (23 rows)
            "bf16": torch.randn(70, 64, generator=g).to(torch.bfloat16),  # stored as uint16 bits, 3 slabs of 24 rows
            "zeros": torch.zeros(64, 64),
            "counts": torch.arange(5000, dtype=torch.int64),
            "mask": torch.rand(40, 5, generator=g) > 0.5,
            "scalar": torch.tensor(3.5),  # 0-d
            "empty": torch.zeros(0, 4),
        },
        "order": np.arange(3000, dtype=np.int32)[::-1].copy(),
        "step": 9,
    }


def stored_bytes(value: torch.Tensor | np.ndarray[Any, Any]) -> bytes:
    arr, _ = stored_array(value)
    return arr.tobytes()


def zarr_array(path: Path, name: str) -> Any:
    """Array `name` of the checkpoint at `path`, opened by zarr-python."""
    return zarr.open_array(store=LocalStore(str(path), read_only=True), path=name, mode="r")


def assert_zarr_python_reads_every_leaf(path: Path, expected: dict[str, Any]) -> None:
    """zarr-python opens every array of the checkpoint and finds each leaf's bytes (its own array, or its
    place in %packed) exactly as the state held them."""
    group = zarr.open_group(store=LocalStore(str(path), read_only=True), mode="r")
    records = read_attrs(path)["leaves"]
    _, leaves = flatten(expected)
    assert len(records) == len(leaves)
    packed = np.asarray(zarr_array(path, PACKED)[...]) if PACKED in group else None
    for rec, leaf in zip(records, leaves, strict=True):
        if "array" in rec:
            got = np.asarray(zarr_array(path, rec["array"])[...])
            assert got.dtype == np.dtype(rec["stored"]) and list(got.shape) == rec["shape"], leaf.path
            assert got.tobytes() == stored_bytes(leaf.value), leaf.path
        else:
            assert packed is not None
            offset, nbytes = rec["packed"]
            assert packed[offset : offset + nbytes].tobytes() == stored_bytes(leaf.value), leaf.path


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_zarr_python_reads_every_array_bit_for_bit(tmp_path: Path, compression: Compression) -> None:
    s = state()
    path = save_checkpoint(tmp_path, 1, s, keep_last=0, compression=compression, pack_below_bytes=0)
    assert_zarr_python_reads_every_leaf(path, s)
    assert len(list((path / "model/w/c").iterdir())) == 4  # slabs along dim 0
    packed = save_checkpoint(tmp_path, 2, s, keep_last=0, compression=compression, pack_below_bytes=4096)
    assert_zarr_python_reads_every_leaf(packed, s)


def zarr_python_write_array(
    folder: Path, name: str, arr: np.ndarray[Any, Any], compression: Compression, fsync: bool
) -> dict[str, Any]:
    """An uncompressed array written by zarr-python itself, as trinity wrote them before it wrote its own."""
    z = zarr.create_array(
        store=LocalStore(str(folder)), name=name, shape=arr.shape, dtype=arr.dtype,
        chunks=array_chunks(arr.shape, arr.itemsize), compressors=None, config={"write_empty_chunks": True},
    )  # fmt: skip
    z[...] = arr
    return {}  # hashed by the commit, after the write


def test_our_files_are_the_bytes_zarr_python_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = state()
    ours = save_checkpoint(tmp_path / "ours", 1, s, keep_last=0, pack_below_bytes=0)
    monkeypatch.setattr(ckpt_zarr, "write_array", zarr_python_write_array)
    theirs = save_checkpoint(tmp_path / "theirs", 1, s, keep_last=0, pack_below_bytes=0)
    files = {p.relative_to(theirs).as_posix() for p in theirs.rglob("*") if p.is_file()} - {MARKER, "zarr.json"}
    assert files == {p.relative_to(ours).as_posix() for p in ours.rglob("*") if p.is_file()} - {MARKER, "zarr.json"}
    assert {"model/zarr.json", "model/scalar/c", "model/empty/zarr.json", "model/w/c/3/0"} <= files
    assert "model/empty/c" not in files  # an empty array has no chunk
    for rel in sorted(files):
        assert (ours / rel).read_bytes() == (theirs / rel).read_bytes(), rel
    # ... and the checkpoint zarr-python wrote loads through trinity's own reader, checked as it reads.
    back = load_checkpoint(theirs)
    for name, value in s["model"].items():
        assert back["model"][name].dtype == value.dtype and stored_bytes(back["model"][name]) == stored_bytes(value)
    files_digest = read_marker(theirs)["files"]["model/w/c/1/0"]
    assert files_digest[1] == f"{zlib.crc32((theirs / 'model/w/c/1/0').read_bytes()):08x}"


def test_a_rectangle_read_straight_from_the_chunks_equals_zarr_pythons(tmp_path: Path) -> None:
    """What a resharding load reads of an array: rectangles across slab boundaries, within one slab,
    whole rows, with or without the padded last chunk."""
    s = state()
    path = save_checkpoint(tmp_path, 1, s, keep_last=0, pack_below_bytes=0)
    files = read_marker(path)["files"]
    for name in ["model/w", "model/bf16", "model/counts"]:
        arr = raw_array(path, name, files)
        assert arr is not None
        rects = [(slice(10, 90), slice(3, 20)), (slice(0, 26), slice(0, 33)), (slice(26, 101), slice(0, 33)),
                 (slice(50, 51), slice(32, 33)), (slice(5, 5), slice(0, 3))]  # fmt: skip
        for rect in rects:
            sel = rect[: len(arr.shape)]
            (got,) = read_raw(path, [(arr, sel)], files)
            assert got.tobytes() == np.asarray(zarr_array(path, name)[sel]).tobytes(), (name, sel)
