"""Zarr checkpoints: exact round trip against torch.save, bit-exact resume, and crash safety."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import trinity.store.checkpoint_zarr as ckpt_zarr
from trinity.nodes.checkpoints import last_committed_step
from trinity.nodes.seeds import capture_rng_state, restore_rng_state
from trinity.run.layout import NodeDir
from trinity.store.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from trinity.store.checkpoint_commit import (
    MARKER,
    WRITER_ATTR,
    latest_checkpoint,
    latest_committed,
    list_checkpoints,
    prune_checkpoints,
)
from trinity.store.checkpoint_encoding import PACK_BELOW_BYTES


class Net(nn.Module):
    """Linear stack, a bf16 parameter, an fp32 buffer (like the expert bias) and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.hidden = nn.Linear(32, 32)
        self.out = nn.Linear(32, 16, bias=False)
        self.scale = nn.Parameter(torch.randn(32, dtype=torch.bfloat16))
        self.register_buffer("expert_bias", torch.zeros(4))
        self.register_buffer("counts", torch.zeros(4, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.nn.functional.dropout(h * self.scale.float(), p=0.1, training=self.training)
        return self.out(self.hidden(h))


def realistic_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
    with torch.no_grad():
        model.expert_bias.copy_(torch.tensor([0.5, -0.0, 1e-30, -2.0]))
        model.counts.copy_(torch.tensor([1, 2**40, -3, 0]))
    loader = {
        "epoch": 3,
        "cursor": 12345,
        "order": np.random.default_rng(0).permutation(1000).astype(np.int64),
        "weights": np.linspace(0, 1, 7, dtype=np.float32),
        "done": np.array([True, False]),
        "shards": [[0, 10], [1, 20]],
        "generator": np.random.default_rng(5).bit_generator.state,  # holds 128-bit ints
        "name": "phase1",
        "offset": np.int64(7),
        "frac": np.float32(0.25),
    }
    return {
        "model": model.state_dict(),
        "optimizer": {"adamw": opt.state_dict()},
        "loader": loader,
        "rng": capture_rng_state(),
        "step": 2,
        "tokens": 2**35,
        "loss": 2.5,
        "odd": {
            "nan": float("nan"),
            "neg_zero": -0.0,
            "inf": float("-inf"),
            "none": None,
            "tuple": (1, (2, [3.0, None]), "x"),
            "bytes": b"\x00\xff",
            "int_keys": {0: "a", 1: "b", "0": "c"},
            "dtype": torch.bfloat16,
            "size": torch.Size([2, 3]),
            "scalar_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
            "scalar_bool": torch.tensor(True),
            "empty": torch.zeros(0, 5),
            "neg_zeros": torch.full((3, 4), -0.0),
            "int8": torch.arange(-5, 5, dtype=torch.int8),
            "noncontig": torch.arange(12.0).view(3, 4).t(),
            "bf16_big": torch.randn(1024, 600).to(torch.bfloat16),  # above the packing threshold
        },
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality: same types (tuple vs list, int vs str keys), same bits for tensors and floats."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert torch.equal(bits(a), bits(b)), where
        if not a.dtype.is_floating_point or not a.isnan().any():
            assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b], where
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k!r}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("pack_below_bytes", [PACK_BELOW_BYTES, 0])
def test_round_trip_equals_torch_save(tmp_path: Path, pack_below_bytes: int) -> None:
    state = realistic_state()
    torch.save(state, tmp_path / "ref.pt")
    reference = torch.load(tmp_path / "ref.pt", weights_only=False)

    path = save_checkpoint(tmp_path / "ckpts", 2, state, keep_last=3, pack_below_bytes=pack_below_bytes)
    ours = load_checkpoint(path)

    assert_same(reference, ours)
    assert_same(state, ours)
    # Tied or repeated tensors come back as one tensor, as with torch.load.
    assert ours["model"]["scale"].data_ptr() != ours["model"]["inp.weight"].data_ptr()
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 2 and marker["n_leaves"] > 20 and marker["nbytes"] > 1024 * 600 * 2
    if pack_below_bytes == 0:
        assert marker["n_arrays"] == marker["n_leaves"]


def test_shared_tensor_is_stored_once(tmp_path: Path) -> None:
    w = torch.randn(300, 300)
    path = save_checkpoint(tmp_path, 1, {"a": w, "b": w, "c": w.clone()}, keep_last=1, pack_below_bytes=0)
    back = load_checkpoint(path)
    assert back["a"] is back["b"] and back["c"] is not back["a"]
    assert json.loads((path / MARKER).read_text())["n_arrays"] == 2


def test_loaded_state_restores_into_model_and_optimizer(tmp_path: Path) -> None:
    state = realistic_state()
    back = load_checkpoint(save_checkpoint(tmp_path, 2, state, keep_last=1, meta={"phase": "p1"}))
    model = Net()
    model.load_state_dict(back["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(back["optimizer"]["adamw"])
    assert_same(opt.state_dict(), state["optimizer"]["adamw"])
    assert read_checkpoint_meta(tmp_path / "step-00000002") == {"step": 2, "phase": "p1"}


def _train(model: Net, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """Each step draws data from torch, numpy and Python RNGs, so resume needs all three."""
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 16) + float(np.random.rand()) + random.random()
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    _seed_all(1)
    model, opt = Net(), None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    straight = _train(model, opt, 6)

    _seed_all(1)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = _train(model, opt, 3)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng_state(), "step": 3}
    save_checkpoint(tmp_path, 3, state, keep_last=2)
    del model, opt

    _seed_all(99)  # a fresh process: other weights, other RNG positions
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None
    back = load_checkpoint(latest)
    model.load_state_dict(back["model"])
    opt.load_state_dict(back["optimizer"])
    restore_rng_state(back["rng"])
    resumed = _train(model, opt, 3)

    assert [struct.pack("<d", v) for v in first + resumed] == [struct.pack("<d", v) for v in straight]


def test_rng_capture_restore() -> None:
    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_failure_mid_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = {"w": torch.randn(300, 300), "step": 1}
    save_checkpoint(tmp_path, 1, old, keep_last=1)
    real = ckpt_zarr.write_array
    calls = 0

    def disk_full(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(ckpt_zarr, "write_array", disk_full)
    new = {f"w{i}": torch.randn(300, 300) for i in range(6)}
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, 2, new, keep_last=1, pack_below_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert torch.equal(load_checkpoint(tmp_path / "step-00000001")["w"], old["w"])


KILL_CHILD = """
import sys, time, torch
from pathlib import Path
import trinity.store.checkpoint as ckpt
import trinity.store.checkpoint_zarr as ckpt_zarr
real = ckpt_zarr.write_array
def slow(*args):
    out = real(*args)
    time.sleep(0.2)  # a slow disk: the parent has time to kill us mid-write
    return out
ckpt_zarr.write_array = slow
state = {f"w{i}": torch.full((256, 1024), float(i)) for i in range(64)}
ckpt.save_checkpoint(Path(sys.argv[1]), 2, state, keep_last=1, pack_below_bytes=0)
"""


def test_kill_mid_write(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep_last=1)
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(tmp_path)])
    tmp = tmp_path / f".tmp-step-00000002-{child.pid}"
    deadline = time.monotonic() + 30
    while not (tmp.is_dir() and any(p.is_dir() for p in tmp.iterdir())):
        assert child.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL

    assert tmp.is_dir()  # the debris of a dead writer ...
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"  # ... is not a checkpoint
    assert [(s, ok) for s, _, ok in list_checkpoints(tmp_path)] == [(1, True)]
    assert torch.equal(load_checkpoint(tmp_path / "step-00000001")["w"], torch.ones(3))

    save_checkpoint(tmp_path, 3, {"w": torch.zeros(3)}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def test_newest_without_marker_is_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep_last=5)
    p2 = save_checkpoint(tmp_path, 2, {"w": torch.ones(3) * 2}, keep_last=5)
    (p2 / MARKER).unlink()  # cut short between the rename and the marker
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert [(s, ok) for s, _, ok in list_checkpoints(tmp_path)] == [(1, True), (2, False)]
    with pytest.raises(FileNotFoundError, match="not a committed checkpoint"):
        load_checkpoint(p2)


def test_keep_last_prunes_old_and_never_the_newest(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, {"step": step, "w": torch.full((3,), step)}, keep_last=2)
    assert [s for s, _, _ in list_checkpoints(tmp_path)] == [40, 50]
    save_checkpoint(tmp_path, 60, {"step": 6}, keep_last=0)  # 0: keep all
    assert [s for s, _, _ in list_checkpoints(tmp_path)] == [40, 50, 60]
    assert prune_checkpoints(tmp_path, keep_last=1) == [tmp_path / "step-00000040", tmp_path / "step-00000050"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000060"
    assert load_checkpoint(tmp_path / "step-00000060")["step"] == 6


def test_the_step_of_a_checkpoint_is_the_one_its_marker_records(tmp_path: Path) -> None:
    node = NodeDir(tmp_path / "node")
    assert last_committed_step(node) is None  # no checkpoints folder yet
    save_checkpoint(node.checkpoints, 3, {"v": 3}, keep_last=0)
    save_checkpoint(node.checkpoints, 12, {"v": 12}, keep_last=0)
    (node.checkpoints / "step-00000020").mkdir()  # debris without a marker: its name is all it has
    entries = list_checkpoints(node.checkpoints)
    assert [(e.step, e.path.name, e.committed) for e in entries] == [
        (3, "step-00000003", True), (12, "step-00000012", True), (20, "step-00000020", False)
    ]  # fmt: skip
    assert latest_committed(node.checkpoints) == entries[1] and last_committed_step(node) == 12
    # A committed checkpoint copied under a newer name still holds step 3: the name does not decide.
    shutil.copytree(node.checkpoints / "step-00000003", node.checkpoints / "step-00000030")
    assert last_committed_step(node) == 12


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, {"v": 1}, keep_last=3)
    save_checkpoint(tmp_path, 5, {"v": 2}, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]
    assert load_checkpoint(tmp_path / "step-00000005") == {"v": 2}


def _fake_writer(folder: Path, host: str, pid: int, age_s: float = 0.0) -> None:
    folder.mkdir()
    meta = folder / "zarr.json"  # as a writer leaves it before its first array
    meta.write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {WRITER_ATTR: {"host": host, "pid": pid}}})
    )
    t = time.time() - age_s
    for p in (meta, folder):
        os.utime(p, (t, t))


def test_prune_spares_live_writers(tmp_path: Path) -> None:
    host = socket.gethostname()
    live = tmp_path / f".tmp-step-00000009-{os.getppid()}"
    _fake_writer(live, host, os.getppid())  # alive: our parent process
    foreign_recent = tmp_path / ".tmp-step-00000010-1"
    _fake_writer(foreign_recent, "another-node", 1, age_s=60)
    foreign_old = tmp_path / ".tmp-step-00000011-1"
    _fake_writer(foreign_old, "another-node", 1, age_s=7200)
    save_checkpoint(tmp_path, 1, {"v": 1}, keep_last=1, stale_after_s=3600)
    assert live.is_dir() and foreign_recent.is_dir() and not foreign_old.exists()


def test_unsupported_values_are_refused_with_their_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="loader/fn"):
        save_checkpoint(tmp_path, 1, {"loader": {"fn": lambda: 0}}, keep_last=1)
    assert list(tmp_path.iterdir()) == []


def test_float_specials_and_big_ints_survive(tmp_path: Path) -> None:
    values = [math.inf, -math.inf, 5e-324, 2**64 + 1, -(2**70), 0.1, OrderedDict(a=1)]
    back = load_checkpoint(save_checkpoint(tmp_path, 1, {"v": values}, keep_last=1))
    assert_same(values, back["v"])
