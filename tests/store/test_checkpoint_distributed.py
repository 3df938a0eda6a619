"""Checkpoints written by N gloo ranks and loaded by M (N, M in 1, 2, 4) against the full tensors.

The reference is independent of the store: every process builds the same full tensors from a
seed, and torch's own distribute_tensor cuts them into the pieces each layout must hold. Two
launches (spawning ranks is most of this file's time) make every N -> M pair:

    A (2 ranks): load the single-process save into layout L2 (1 -> 2); save in L2 ("two");
                 load "two" into another 2-rank layout (2 -> 2)
    B (4 ranks): load "single" and "two" into L4 (1 -> 4, 2 -> 4); save in L4 ("four"), recording
                 which rank writes which chunk; load "four" into another 4-rank layout (4 -> 4) and
                 into a 2-rank layout on ranks 0 and 1 (4 -> 2: loading is no collective, so ranks 2
                 and 3 standing by changes nothing); refused layouts, a mismatched tree, and a write
                 failure on rank 1
    this process: load "two" and "four" whole, bit for bit (2 -> 1, 4 -> 1)
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import trinity.store.checkpoint_dist as ckpt_dist
from trinity.distributed.testing import run_workers
from trinity.store.checkpoint import load_checkpoint, read_checkpoint_layout, save_checkpoint
from trinity.store.checkpoint_commit import MARKER, latest_checkpoint, read_marker
from trinity.store.checkpoint_integrity import check_checkpoint

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
PACK_BELOW = 64  # bytes: the tiny `norm` is packed (gathered to rank 0), the rest are arrays

# name -> (shape, dtype) of the DTensor leaves, all under "model/" or "optimizer/".
SHARDED = {
    "dense": ((9, 6), torch.float32),  # uneven: 5 + 4 rows on two shards
    "experts": ((5, 6, 4), torch.float32),  # [E, F, D]
    "emb": ((7, 8), torch.bfloat16),
    "exp_avg": ((3, 6), torch.float32),  # 4 shards of 3 rows: the last is empty
    "norm": ((6,), torch.float32),  # 24 bytes: packed
}


def full_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    out = {k: torch.randn(shape, generator=gen).to(dtype) for k, (shape, dtype) in SHARDED.items()}
    out["emb"].view(-1)[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-40]).to(torch.bfloat16)
    return out


def plain_leaves() -> dict[str, Any]:
    return {
        "bias": torch.arange(40, dtype=torch.float32) / 7,  # 160 bytes: its own array, written by rank 0
        "scale": torch.tensor([0.5, -0.0]),
        "order": np.arange(10, dtype=np.int64)[::-1].copy(),
    }


Layout = dict[str, tuple[DeviceMesh, tuple[Placement, ...]]]


def layout(name: str) -> Layout:
    """The meshes and placements of one named layout (a collective: every rank builds it)."""
    R, S = Replicate(), Shard
    if name == "L4":  # HSDP on (2, 2); experts (Shard(1), Shard(0)) on an ep mesh; a 1-D mesh of 4
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        ep = init_device_mesh("cpu", (2, 2), mesh_dim_names=("shard_mod_ep", "ep"))
        flat = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
        return {
            "dense": (hsdp, (R, S(0))),
            "experts": (ep, (S(1), S(0))),
            "emb": (hsdp, (R, S(0))),
            "exp_avg": (flat, (S(0),)),
            "norm": (flat, (S(0),)),
        }
    if name == "L4b":
        m = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
        return {
            "dense": (m, (S(1), S(0))),
            "experts": (m, (S(2), R)),
            "emb": (m, (R, R)),
            "exp_avg": (m, (S(1), R)),
            "norm": (m, (R, S(0))),
        }
    if name == "L2":
        m = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        return {"dense": (m, (S(1),)), "experts": (m, (S(0),)), "emb": (m, (S(0),)), "exp_avg": (m, (S(1),)),
                "norm": (m, (S(0),))}  # fmt: skip
    if name == "L2b":  # a replicate dim of size 1; on ranks 0 and 1 of any world
        if dist.get_world_size() == 2:
            m = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
        else:
            m = DeviceMesh("cpu", torch.arange(2).reshape(1, 2), mesh_dim_names=("replicate", "shard"))
        return {"dense": (m, (R, S(0))), "experts": (m, (R, S(2))), "emb": (m, (S(1), S(1))),
                "exp_avg": (m, (R, R)), "norm": (m, (R, S(0)))}  # fmt: skip
    raise ValueError(name)


def tree(v: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The training-like state tree around the five sharded values `v`."""
    model = {"dense.weight": v["dense"], "experts.w": v["experts"], "emb.weight": v["emb"], "norm": v["norm"]}
    model["lm_head.weight"] = v["emb"]  # tied: the same tensor twice
    opt = {"state": {0: {"exp_avg": v["exp_avg"], "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    return {"model": model, "optimizer": opt, "plain": plain_leaves(), "step": 7, "name": "run"}


def state_in(lay: Layout, fill: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, Any]:
    """The state tree with the DTensor leaves in `lay`, holding `fill(full tensor)`."""
    full = full_tensors()
    return tree({k: distribute_tensor(fill(full[k]), mesh, list(pl)) for k, (mesh, pl) in lay.items()})


def bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def same(a: Any, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def check_sharded(loaded: dict[str, Any], lay: Layout, tag: str) -> list[str]:
    """Mismatches of a load into `lay`: each leaf a DTensor of that layout whose local piece is
    torch's own piece of the full tensor; the plain leaves whole."""
    full = full_tensors()
    got = {
        "dense": loaded["model"]["dense.weight"],
        "experts": loaded["model"]["experts.w"],
        "emb": loaded["model"]["emb.weight"],
        "norm": loaded["model"]["norm"],
        "exp_avg": loaded["optimizer"]["state"][0]["exp_avg"],
    }
    bad = []
    for k, (mesh, pl) in lay.items():
        v = got[k]
        want = distribute_tensor(full[k], mesh, list(pl)).to_local()
        if not isinstance(v, DTensor) or v.device_mesh != mesh or tuple(v.placements) != pl:
            bad.append(f"{tag} {k}: {type(v).__name__} {getattr(v, 'placements', None)}, want {pl}")
        elif tuple(v.shape) != tuple(full[k].shape) or not same(v.to_local(), want):
            bad.append(f"{tag} {k}: local piece {tuple(v.to_local().shape)} differs from torch's {tuple(want.shape)}")
    if loaded["model"]["lm_head.weight"] is not loaded["model"]["emb.weight"]:
        bad.append(f"{tag}: the tied weight came back as two tensors")
    plain = plain_leaves()
    if not (same(loaded["plain"]["bias"], plain["bias"]) and same(loaded["plain"]["scale"], plain["scale"])):
        bad.append(f"{tag}: plain tensors differ")
    if not np.array_equal(loaded["plain"]["order"], plain["order"]) or loaded["step"] != 7:
        bad.append(f"{tag}: plain leaves differ")
    return bad


def launch_a(rank: int, world: int, root: str) -> list[str]:
    lay = layout("L2")
    bad = check_sharded(
        load_checkpoint(Path(root) / "single" / "step-00000001", like=state_in(lay, torch.zeros_like)), lay, "1->2"
    )
    path = save_checkpoint(Path(root) / "two", 1, state_in(lay), keep_last=2, pack_below_bytes=PACK_BELOW)
    other = layout("L2b")
    return bad + check_sharded(load_checkpoint(path, like=state_in(other, torch.zeros_like)), other, "2->2")


def pieces(lay: Layout) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]]:
    """This rank's (offset, shape, writes it) per DTensor, from torch's geometry: the test's expectation."""
    full = full_tensors()
    out = {}
    for k, (mesh, pl) in lay.items():
        shape, offset = compute_local_shape_and_global_offset(full[k].shape, mesh, list(pl))
        coord = mesh.get_coordinate()
        assert coord is not None
        writes = all(c == 0 for c, p in zip(coord, pl, strict=True) if isinstance(p, Replicate))
        out[k] = (tuple(offset), tuple(shape), writes)
    return out


@dataclass
class LaunchB:
    bad: list[str]
    writes: list[tuple[int, str, str]]  # (rank, array, chunk key)
    pieces: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]]
    refused: str
    mismatch: str
    failure: str
    path: str


def _error(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def launch_b(rank: int, world: int, root: str) -> LaunchB:
    base = Path(root)
    lay = layout("L4")
    like = state_in(lay, torch.zeros_like)
    bad = check_sharded(load_checkpoint(base / "single" / "step-00000001", like=like), lay, "1->4")
    bad += check_sharded(load_checkpoint(base / "two" / "step-00000001", like=like), lay, "2->4")

    writes: list[tuple[int, str, str]] = []
    real = ckpt_dist._write_piece

    async def recording(root_group: Any, name: str, region: Any, arr: Any) -> str:
        key = await real(root_group, name, region, arr)
        writes.append((rank, name, key))
        return key

    ckpt_dist._write_piece = recording  # type: ignore[assignment]
    path = save_checkpoint(base / "four", 2, state_in(lay), keep_last=2, pack_below_bytes=PACK_BELOW)
    ckpt_dist._write_piece = real  # type: ignore[assignment]
    other = layout("L4b")
    bad += check_sharded(load_checkpoint(path, like=state_in(other, torch.zeros_like)), other, "4->4")
    two = layout("L2b")  # every rank builds the mesh; ranks 0 and 1 are the 2-rank job
    if rank < 2:
        like2 = state_in(two, torch.zeros_like)
        bad += check_sharded(load_checkpoint(path, like=like2), two, "4->2")
        # Part of the tree only: the optimizer comes back whole.
        part = load_checkpoint(path, like={"model": like2["model"]})
        if not same(part["optimizer"]["state"][0]["exp_avg"], full_tensors()["exp_avg"]):
            bad.append("4->2 partial: the optimizer leaf is not the full tensor")

    # Nested uneven shards: two ranks would share a chunk.
    mesh = lay["dense"][0]
    nested = {"w": distribute_tensor(torch.ones(6, 3), mesh, [Shard(0), Shard(0)])}
    refused = _error(lambda: save_checkpoint(base / "four", 3, nested, keep_last=2, pack_below_bytes=0))
    # Rank 3 passes a tree with one more leaf.
    tree = {"w": distribute_tensor(torch.ones(8, 3), mesh, [Replicate(), Shard(0)])}
    if rank == 3:
        tree["extra"] = torch.zeros(2)
    mismatch = _error(lambda: save_checkpoint(base / "four", 3, tree, keep_last=2, pack_below_bytes=0))

    # Rank 1's disk fills up after its first piece.
    calls = 0

    async def disk_full(root_group: Any, name: str, region: Any, arr: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(root_group, name, region, arr)

    if rank == 1:
        ckpt_dist._write_piece = disk_full  # type: ignore[assignment]
    failure = _error(lambda: save_checkpoint(base / "four", 3, state_in(lay), keep_last=2, pack_below_bytes=0))
    ckpt_dist._write_piece = real  # type: ignore[assignment]
    return LaunchB(bad, writes, pieces(lay), refused, mismatch, failure, str(path))


@dataclass
class Runs:
    root: Path
    a: list[list[str]]
    b: list[LaunchB]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("ckpt")
    single = tree(full_tensors())
    save_checkpoint(root / "single", 1, single, keep_last=1, pack_below_bytes=PACK_BELOW)
    a = run_workers(launch_a, 2, str(root), timeout_s=120)
    b = run_workers(launch_b, 4, str(root), timeout_s=120)
    return Runs(root, a, b)


@pytest.mark.slow  # 2- and 4-process jobs
def test_every_layout_loads_into_every_other(runs: Runs) -> None:
    bad = [m for per_rank in (runs.a, [r.bad for r in runs.b]) for ranks in per_rank for m in ranks]
    assert bad == []


@pytest.mark.slow  # reads what the 2- and 4-process jobs wrote
@pytest.mark.parametrize("which", ["two/step-00000001", "four/step-00000002"])
def test_one_process_reads_the_full_tensors_bit_for_bit(runs: Runs, which: str) -> None:
    state = load_checkpoint(runs.root / which)
    full = full_tensors()
    m = state["model"]
    assert not any(isinstance(v, DTensor) for v in m.values())
    for k, got in {"dense": m["dense.weight"], "experts": m["experts.w"], "emb": m["emb.weight"], "norm": m["norm"],
                   "exp_avg": state["optimizer"]["state"][0]["exp_avg"]}.items():  # fmt: skip
        assert same(got, full[k]), k
    assert m["lm_head.weight"] is m["emb.weight"]
    assert torch.isnan(m["emb.weight"].view(-1)[1]) and str(m["emb.weight"].view(-1)[0].item()) == "-0.0"
    assert state["step"] == 7 and state["optimizer"]["param_groups"] == [{"lr": 0.1}]
    assert same(state["plain"]["bias"], plain_leaves()["bias"])
    world = 2 if which.startswith("two") else 4
    lay = read_checkpoint_layout(runs.root / which)
    assert lay["world_size"] == world and set(lay["dtensors"]) == {
        "model/dense.weight", "model/experts.w", "model/emb.weight", "model/norm", "optimizer/state.0.exp_avg"
    }  # fmt: skip
    if world == 4:
        assert lay["dtensors"]["model/experts.w"] == {
            "mesh_shape": [2, 2], "mesh_dim_names": ["shard_mod_ep", "ep"], "placements": ["S(1)", "S(0)"],
            "chunks": [3, 3, 4],
        }  # fmt: skip
        assert lay["dtensors"]["model/norm"]["chunks"] is None  # packed
    assert read_checkpoint_layout(runs.root / "single" / "step-00000001") == {"world_size": 1, "dtensors": {}}


@pytest.mark.slow  # 2- and 4-process jobs
def test_every_chunk_is_written_by_exactly_one_rank(runs: Runs) -> None:
    arrays = {"dense": "model/dense.weight", "experts": "model/experts.w", "emb": "model/emb.weight",
              "exp_avg": "optimizer/state.0.exp_avg"}  # fmt: skip
    folder = Path(runs.b[0].path)
    expected: dict[tuple[str, str], int] = {}
    for k, name in arrays.items():
        per_rank = [r.pieces[k] for r in runs.b]
        chunks = [max(p[1][d] for p in per_rank) for d in range(len(per_rank[0][1]))]
        meta = json.loads((folder / name / "zarr.json").read_text())
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == chunks, name
        for rank, (offset, shape, writes) in enumerate(per_rank):
            if writes and 0 not in shape:
                key = f"{name}/c/" + "/".join(str(o // c) for o, c in zip(offset, chunks, strict=True))
                assert key not in expected, f"{key}: owned by ranks {expected[key]} and {rank}"
                expected[key] = rank
        on_disk = {str(p.relative_to(folder)) for p in (folder / name / "c").rglob("*") if p.is_file()}
        assert on_disk == {key for key in expected if key.startswith(name + "/")}, name
    writes = sorted((key, rank) for r in runs.b for rank, _, key in r.writes)
    assert writes == sorted((key, rank) for key, rank in expected.items())
    # The replicas (index 1 on the HSDP replicate dim: ranks 2 and 3) wrote no dense/emb chunk;
    # rank 3's empty exp_avg piece wrote nothing.
    assert len(expected) == 2 + 4 + 2 + 3


@pytest.mark.slow  # 2- and 4-process jobs
@pytest.mark.parametrize("which", ["two/step-00000001", "four/step-00000002"])
def test_the_marker_holds_the_checksum_of_every_ranks_chunks(runs: Runs, which: str) -> None:
    """Each rank hashed the chunks it wrote and rank 0 the rest: the marker has every file, as on disk."""
    path = runs.root / which
    files = read_marker(path)["files"]
    on_disk = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file() and p.name != MARKER}
    assert set(files) == set(on_disk)
    for rel, p in on_disk.items():
        assert files[rel] == [p.stat().st_size, f"{zlib.crc32(p.read_bytes()):08x}"], rel
    assert check_checkpoint(path) == ([], [])


@pytest.mark.slow  # 2- and 4-process jobs
def test_a_write_failure_on_one_rank_commits_nothing(runs: Runs) -> None:
    failures = [r.failure for r in runs.b]
    assert failures[1].startswith("OSError") and "No space left" in failures[1]
    for rank in (0, 2, 3):
        assert failures[rank].startswith("CollectiveSaveError") and "rank 1 failed (OSError" in failures[rank]
    root = runs.root / "four"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no step 3, no temporary folder
    assert latest_checkpoint(root) == root / "step-00000002"


@pytest.mark.slow  # 2- and 4-process jobs
def test_refused_layouts_and_trees_raise_on_every_rank(runs: Runs) -> None:
    for r in runs.b:
        assert r.refused.startswith("ValueError: w: placements ['S(0)', 'S(0)']"), r.refused
        assert "rank 1 the slice [2:3] of dim 0" in r.refused
        assert r.mismatch.startswith("ValueError") and "ranks [3] passed state trees" in r.mismatch, r.mismatch


def test_one_rank_dtensors_save_whole_with_either_writer(tmp_path: Path, one_rank_mesh: DeviceMesh) -> None:
    lay: Layout = {k: (one_rank_mesh, (Shard(0),)) for k in SHARDED}
    state = state_in(lay)
    single = save_checkpoint(tmp_path / "single", 1, state, keep_last=1, pack_below_bytes=PACK_BELOW)
    collective = save_checkpoint(
        tmp_path / "coll", 1, state, keep_last=1, pack_below_bytes=PACK_BELOW, distributed=True
    )
    assert read_checkpoint_layout(single) == {"world_size": 1, "dtensors": {}}
    assert read_checkpoint_layout(collective)["dtensors"]["model/dense.weight"]["placements"] == ["S(0)"]
    for path in (single, collective):
        whole = load_checkpoint(path)
        assert same(whole["model"]["experts.w"], full_tensors()["experts"])
        assert same(whole["model"]["emb.weight"], full_tensors()["emb"])
        assert check_sharded(load_checkpoint(path, like=state_in(lay, torch.zeros_like)), lay, str(path)) == []


@pytest.mark.slow  # reads what the 2- and 4-process jobs wrote
@pytest.mark.parametrize("which", ["two/step-00000001", "four/step-00000002"])
def test_zarr_python_reads_every_ranks_chunks_bit_for_bit(runs: Runs, which: str) -> None:
    """The chunks each rank wrote itself (trinity.store.checkpoint_zarr) are Zarr as zarr-python reads it."""
    import zarr
    from zarr.storage import LocalStore

    full = full_tensors()
    arrays = {"dense": "model/dense.weight", "experts": "model/experts.w", "emb": "model/emb.weight",
              "exp_avg": "optimizer/state.0.exp_avg"}  # fmt: skip
    for k, name in arrays.items():
        z = zarr.open_array(store=LocalStore(str(runs.root / which), read_only=True), path=name, mode="r")
        assert np.asarray(z[...]).tobytes() == bits(full[k]), name
