"""Asynchronous checkpoints (trinity.store.checkpoint_async) against synchronous ones.

The reference is the synchronous save of the same state: an asynchronous checkpoint must commit the
same files, bit for bit, holding the values of the moment it was submitted, however the state changes
while it is written. The writer is held at a gate (its write_tree blocks on an event) so that the
interleavings are forced, not hoped for. The 2-rank case runs training-like collectives on the default
group while the worker's exchanges run on their gloo group.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import trinity.store.checkpoint as ckpt
from trinity.distributed.testing import run_workers
from trinity.store.checkpoint import load_checkpoint, save_checkpoint
from trinity.store.checkpoint_async import AsyncCheckpointer
from trinity.store.checkpoint_commit import MARKER, latest_committed, list_checkpoints

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a committed checkpoint; the marker without its commit time (the rest must be equal)."""
    out: dict[str, bytes] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == MARKER:
                marker = json.loads(data)
                del marker["time"]
                data = json.dumps(marker, sort_keys=True).encode()
            out[str(p.relative_to(folder))] = data
    return out


def state(w: torch.Tensor) -> dict[str, Any]:
    return {
        "model": {"w": w, "tied": w, "b": torch.arange(5, dtype=torch.bfloat16)},
        "optimizer": {"state": {0: {"exp_avg": w * 2}}},
        "loader": {"order": np.arange(6), "pos": 3},
        "step": 1,
    }


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds every write of a checkpoint from another thread until set (the worker waits inside write_tree)."""
    opened = threading.Event()
    real = ckpt.write_tree

    def held(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            assert opened.wait(timeout=30), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "write_tree", held)
    yield opened
    opened.set()


def test_the_checkpoint_holds_the_state_of_the_step_it_was_submitted_at(tmp_path: Path, gate: threading.Event) -> None:
    w = torch.randn(600, 500)  # above the packing threshold (1 MiB): an array of its own
    expected = files(save_checkpoint(tmp_path / "sync", 1, state(w.clone()), keep_last=1, distributed=False))
    saver = AsyncCheckpointer()
    saver.submit(tmp_path / "async", 1, state(w), keep_last=1)
    w.add_(1.0)  # training goes on: the parameter changes in place while the save waits to be written
    assert saver.in_flight and latest_committed(tmp_path / "async") is None
    gate.set()
    assert saver.wait() == tmp_path / "async" / "step-00000001"
    assert files(tmp_path / "async" / "step-00000001") == expected  # bit for bit the synchronous checkpoint
    back = load_checkpoint(tmp_path / "async" / "step-00000001")
    assert back["model"]["w"] is back["model"]["tied"]  # tied weights stay tied


def test_at_most_one_save_in_flight(tmp_path: Path, gate: threading.Event) -> None:
    saver = AsyncCheckpointer()
    saver.submit(tmp_path, 1, {"w": torch.ones(3)}, keep_last=5)
    second = threading.Thread(target=saver.submit, args=(tmp_path, 2, {"w": torch.ones(3) * 2}, 5))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # the next submit waits for the one in flight
    gate.set()
    second.join(timeout=60)
    assert saver.waited_s >= 0.4
    saver.wait()
    assert [c.step for c in list_checkpoints(tmp_path)] == [1, 2]


def test_a_failed_write_is_raised_at_the_next_submit_and_nothing_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(folder: Path, *args: Any, **kwargs: Any) -> Any:
        folder.mkdir(parents=True)
        raise OSError(28, "No space left on device")

    saver = AsyncCheckpointer()
    saver.submit(tmp_path, 1, {"w": torch.ones(3)}, keep_last=2)
    saver.wait()
    monkeypatch.setattr(ckpt, "write_tree", broken)
    saver.submit(tmp_path, 2, {"w": torch.ones(3)}, keep_last=2)
    with pytest.raises(OSError, match="No space left"):  # step 2's error, raised before step 3 starts
        saver.submit(tmp_path, 3, {"w": torch.ones(3)}, keep_last=2)
    assert not saver.in_flight and saver.wait() is None  # raised once, then gone
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no temporary folder left
    saver.submit(tmp_path, 4, {"w": torch.ones(3)}, keep_last=2)
    with pytest.raises(OSError, match="No space left"):  # and raised by a wait as well
        saver.wait()


# -- two gloo ranks -------------------------------------------------------------------------------


def two_rank_state(step: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    gen = torch.Generator().manual_seed(step)
    full = {"big": torch.randn(64, 40, generator=gen), "norm": torch.randn(6, generator=gen)}
    return {
        "model": {
            "big": distribute_tensor(full["big"], mesh, [Shard(0)]),
            "norm": distribute_tensor(full["norm"], mesh, [Replicate()]),  # small: gathered and packed
            "emb": distribute_tensor(full["big"].to(torch.bfloat16), mesh, [Shard(1)]),
        },
        "bias": torch.arange(40, dtype=torch.float32) / 7,
        "step": step,
    }


def async_two_ranks(rank: int, world: int, root: str) -> dict[str, dict[str, bytes]]:
    base = Path(root)
    sync_path = save_checkpoint(base / "sync", 3, two_rank_state(3), keep_last=2, pack_below_bytes=64)
    saver = AsyncCheckpointer()
    live = two_rank_state(3)
    saver.submit(base / "async", 3, live, keep_last=2, pack_below_bytes=64)
    with torch.no_grad():
        live["model"]["big"].to_local().add_(1.0)  # training changes the parameter in place meanwhile
    for _ in range(200):  # and runs its own collectives on the default group while the worker exchanges
        dist.all_reduce(torch.ones(1000))
    committed = saver.wait()
    dist.barrier()
    out = {"sync": files(sync_path)} if rank == 0 else {}
    if rank == 0:
        assert committed is not None
        out["async"] = files(committed)
    return out


@pytest.mark.slow  # two spawned gloo ranks
def test_two_ranks_commit_the_synchronous_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    got = run_workers(async_two_ranks, 2, str(tmp_path), timeout_s=120)
    assert got[0]["async"] == got[0]["sync"] and len(got[0]["sync"]) > 5
    loaded = load_checkpoint(tmp_path / "async" / "step-00000003")
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(loaded["model"]["big"], torch.randn(64, 40, generator=gen))  # the value at submit
