"""Damaged checkpoints are refused: a deleted chunk, flipped bits, a changed metadata file or marker.

Each test damages the files of a real committed checkpoint on disk, as a failing disk or a careless
`rm` would, and checks that loading raises CheckpointError naming the checkpoint and the array,
instead of reading Zarr's fill value (zeros) or the changed bits.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

import trinity.store.checkpoint_zarr as ckpt_zarr
from trinity.errors import CheckpointError
from trinity.store.checkpoint import load_checkpoint, save_checkpoint
from trinity.store.checkpoint_commit import MARKER, read_marker
from trinity.store.checkpoint_integrity import check_checkpoint, verify_chunks
from trinity.store.checkpoint_zarr import read_attrs

BIG = "model/big"  # 4 chunks of 64 rows (CHUNK_BYTES is lowered to 64 KiB below)
ZERO = "model/zero"  # all zeros: its chunks exist all the same


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_zarr, "CHUNK_BYTES", 64 * 1024)


def state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"big": torch.randn(256, 128, generator=g), "zero": torch.zeros(256, 128), "small": torch.ones(3)},
        "step": 5,
    }


def saved(tmp_path: Path, compression: ckpt_zarr.Compression = "none") -> Path:
    return save_checkpoint(tmp_path, 5, state(), keep_last=0, compression=compression, pack_below_bytes=4096)


def chunks(path: Path, array: str) -> list[Path]:
    return sorted(p for p in (path / array / "c").rglob("*") if p.is_file())


def crc32(file: Path) -> str:
    return f"{zlib.crc32(file.read_bytes()):08x}"


def flip(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0x10
    file.write_bytes(bytes(data))


def test_intact_checkpoints_load_and_every_chunk_of_zeros_is_written(tmp_path: Path) -> None:
    path = saved(tmp_path)
    got = load_checkpoint(path)
    assert torch.equal(got["model"]["big"], state()["model"]["big"])
    assert len(chunks(path, BIG)) == 4 and len(chunks(path, ZERO)) == 4  # all-zero chunks too
    assert check_checkpoint(path) == ([], [])


def test_the_marker_records_every_file_with_its_crc32(tmp_path: Path) -> None:
    path = saved(tmp_path)
    assert read_marker(path)["checksum"] == "crc32"
    files = read_marker(path)["files"]
    on_disk = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file() and p.name != MARKER}
    assert set(files) == set(on_disk)
    for rel, p in on_disk.items():
        assert files[rel] == [p.stat().st_size, crc32(p)], rel


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("array", [BIG, ZERO, "%packed"])
def test_a_deleted_chunk_is_an_error_naming_the_checkpoint_and_the_array(
    tmp_path: Path, array: str, compression: ckpt_zarr.Compression
) -> None:
    path = saved(tmp_path, compression)
    chunks(path, array)[-1].unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value) and f"array {array}: chunk " in str(exc.value) and "missing" in str(exc.value)
    problems, _ = check_checkpoint(path)
    assert len(problems) == 1 and f"array {array}" in problems[0]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_flipped_bits_in_a_chunk_are_an_error(tmp_path: Path, compression: ckpt_zarr.Compression) -> None:
    path = saved(tmp_path, compression)
    chunk = chunks(path, BIG)[1]
    flip(chunk, chunk.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{path}: array {BIG}: chunk c/1/0 does not match its crc32"):
        load_checkpoint(path)


def test_a_changed_array_metadata_file_is_an_error(tmp_path: Path) -> None:
    path = saved(tmp_path)
    meta_file = path / BIG / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["fill_value"] = 1.0  # same size would not matter: the checksum differs
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{path}: {BIG}/zarr.json"):
        load_checkpoint(path)


def test_a_truncated_marker_is_an_error(tmp_path: Path) -> None:
    path = saved(tmp_path)
    (path / MARKER).write_text((path / MARKER).read_text()[:40])
    with pytest.raises(CheckpointError, match=rf"{path}/{MARKER} cannot be read"):
        load_checkpoint(path)


def test_several_problems_are_all_listed_by_check(tmp_path: Path) -> None:
    path = saved(tmp_path)
    chunks(path, BIG)[0].unlink()
    flip(chunks(path, ZERO)[2], 7)
    problems, _ = check_checkpoint(path)
    assert problems == [
        f"{path}: array {BIG}: chunk c/0/0 is missing",
        f"{path}: array {ZERO}: chunk c/2/0 does not match its crc32 checksum in the COMMITTED marker "
        "(its bytes changed)",
    ]
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert str(exc.value).removeprefix("checkpoint damaged: ") in problems  # the first it met


def test_a_rectangle_read_checks_the_chunks_it_touches(tmp_path: Path) -> None:
    """A resharding load reads one rectangle per rank: only the chunks meeting it are checked."""
    path = saved(tmp_path)
    marker, records = read_marker(path), read_attrs(path)["leaves"]
    chunks(path, BIG)[3].unlink()  # rows 192:256
    verify_chunks(path, marker, [(BIG, (slice(0, 130), slice(0, 128)))], records)  # chunks 0..2
    with pytest.raises(CheckpointError, match="chunk c/3/0 is missing"):
        verify_chunks(path, marker, [(BIG, (slice(150, 193), slice(0, 128)))], records)


def test_a_marker_without_checksums_is_checked_structurally(tmp_path: Path) -> None:
    """Checkpoints committed before checksums existed still load; a missing chunk is still an error."""
    path = saved(tmp_path)
    marker = json.loads((path / MARKER).read_text())
    del marker["files"], marker["checksum"]
    (path / MARKER).write_text(json.dumps(marker))
    assert torch.equal(load_checkpoint(path)["model"]["big"], state()["model"]["big"])
    problems, notes = check_checkpoint(path)
    assert problems == [] and "no checksums" in notes[0] and "structurally" in notes[0]
    chunks(path, ZERO)[0].unlink()
    with pytest.raises(CheckpointError, match=rf"{path}: array {ZERO}: chunk c/0/0 is missing"):
        load_checkpoint(path)


def test_a_collective_save_records_the_ranks_chunks_and_checks_them(tmp_path: Path, one_rank_mesh: DeviceMesh) -> None:
    """The collective writer (trinity.store.checkpoint_dist): each rank hashes the chunks it writes."""
    w = distribute_tensor(torch.randn(64, 32), one_rank_mesh, [Shard(0)])
    path = save_checkpoint(tmp_path, 1, {"model": {"w": w}}, keep_last=0, pack_below_bytes=0, distributed=True)
    files = read_marker(path)["files"]
    chunk = path / "model/w/c/0/0"
    assert files["model/w/c/0/0"] == [chunk.stat().st_size, crc32(chunk)]
    assert check_checkpoint(path) == ([], [])
    flip(chunk, 100)
    like = {"model": {"w": distribute_tensor(torch.zeros(64, 32), one_rank_mesh, [Shard(0)])}}
    for kwargs in ({}, {"like": like}):
        with pytest.raises(CheckpointError, match=rf"{path}: array model/w: chunk c/0/0 does not match"):
            load_checkpoint(path, **kwargs)
    chunk.unlink()
    with pytest.raises(CheckpointError, match=rf"{path}: array model/w: chunk c/0/0 is missing"):
        load_checkpoint(path, like=like)


def test_a_marker_with_sha256_checksums_is_verified_with_sha256(tmp_path: Path) -> None:
    """Checkpoints committed before crc32 (checksum "sha256") still load, checked with sha256."""
    path = saved(tmp_path)
    marker = json.loads((path / MARKER).read_text())
    marker["checksum"] = "sha256"
    marker["files"] = {rel: [size, hashlib.sha256((path / rel).read_bytes()).hexdigest()]
                       for rel, (size, _) in marker["files"].items()}  # fmt: skip
    (path / MARKER).write_text(json.dumps(marker))
    assert torch.equal(load_checkpoint(path)["model"]["big"], state()["model"]["big"])
    assert check_checkpoint(path) == ([], [])
    flip(chunks(path, BIG)[2], 5)
    with pytest.raises(CheckpointError, match=rf"{path}: array {BIG}: chunk c/2/0 does not match its sha256"):
        load_checkpoint(path)
    for compression in ("zstd",):  # zarr-python's reading path (VerifyingStore) too
        zpath = saved(tmp_path / compression, compression)
        zmarker = json.loads((zpath / MARKER).read_text())
        zmarker["checksum"] = "sha256"
        zmarker["files"] = {rel: [size, hashlib.sha256((zpath / rel).read_bytes()).hexdigest()]
                            for rel, (size, _) in zmarker["files"].items()}  # fmt: skip
        (zpath / MARKER).write_text(json.dumps(zmarker))
        assert torch.equal(load_checkpoint(zpath)["model"]["big"], state()["model"]["big"])
