"""Newton-Schulz of sharded matrices (owner rank gathers, computes, scatters) against the whole matrix."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from trinity.distributed.testing import run_workers
from trinity.optim.muon import zeropower_via_newtonschulz
from trinity.optim.muon_sharded import orthogonalise_sharded

pytestmark = pytest.mark.slow  # multi-rank: gloo processes

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# (shape, mesh shape, placements): uneven pieces (7 rows over 4: 2, 2, 2, 1), an empty piece
# (3 rows over 4), a column cut of stacked experts beside an expert split, a replicated copy,
# and two dims cutting one matrix (the gather-everywhere fallback).
CASES: list[tuple[tuple[int, ...], tuple[int, ...], list[Any]]] = [
    ((7, 5), (4,), [Shard(0)]),
    ((3, 6), (4,), [Shard(0)]),
    ((4, 6, 5), (2, 2), [Shard(0), Shard(1)]),
    ((9, 4), (2, 2), [Replicate(), Shard(0)]),
    ((6, 8), (2, 2), [Shard(0), Shard(1)]),
]


def newton_schulz(x: torch.Tensor) -> torch.Tensor:
    return zeropower_via_newtonschulz(x, COEFFICIENTS, 5, 1e-7, torch.float32)


def _worker(rank: int, world: int) -> list[float]:
    errors = []
    for k, (shape, mesh_shape, placements) in enumerate(CASES):
        full = torch.randn(shape, generator=torch.Generator().manual_seed(k))
        mesh = init_device_mesh("cpu", mesh_shape)
        update = distribute_tensor(full, mesh, placements)
        for index in range(2):  # two owners
            mine = orthogonalise_sharded(update.to_local(), update, newton_schulz, index)
            got = DTensor.from_local(mine, mesh, update.placements, shape=update.shape, stride=update.stride())
            errors.append((got.full_tensor() - newton_schulz(full)).abs().max().item())
    return errors


def test_sharded_newton_schulz_equals_whole_matrix() -> None:
    for errors in run_workers(_worker, 4):
        assert max(errors) < 1e-5, errors
