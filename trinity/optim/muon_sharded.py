"""Newton-Schulz on sharded (DTensor) Muon updates: whole matrices, each computed by one owner rank.

FSDP2 cuts every matrix into row (or, for experts, column) pieces over the ranks of a shard group;
Muon must orthogonalise each matrix whole. Gathering every matrix on every rank would repeat all
of Newton-Schulz on each rank of the group (at 128 ranks an FSDP group, 128 times). Instead:

    for the k-th Muon matrix of a step, the group rank  owner = k mod group size:
      gather   the pieces of the update to the owner        (dist.gather, pieces padded to equal size)
      owner    assembles the matrix, runs Newton-Schulz     (per trailing matrix, batched over experts)
      scatter  the owner's result back, piece by piece      (dist.scatter)

so the work is spread over the group and each rank receives only its own piece of the result.
Shards of a leading (expert) dimension always cut between whole experts and are left alone;
replicas (HSDP) hold the same update and each replica group computes it alike. Pieces follow
torch.chunk's rule (ceil(n / size) rows, the last ones shorter or empty), as DTensor's Shard does.
A layout with two mesh dimensions cutting the matrices falls back to gathering everywhere.

Legend: S ranks in the gather group, n the length of the cut tensor dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement


def _matrix_cuts(update: DTensor) -> list[tuple[int, int]]:
    """(mesh dim, tensor dim) of every shard that cuts the trailing matrices."""
    return [
        (i, pl.dim) for i, pl in enumerate(update.placements) if isinstance(pl, Shard) and pl.dim >= update.ndim - 2
    ]


def _whole_matrices(placements: tuple[Placement, ...], ndim: int) -> list[Placement]:
    """The placements under which every local piece holds whole trailing matrices."""
    return [pl if isinstance(pl, Shard) and pl.dim < ndim - 2 else Replicate() for pl in placements]


def _pad(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    if x.shape[dim] == length:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def orthogonalise_sharded(
    update: torch.Tensor, like: DTensor, newton_schulz: Callable[[torch.Tensor], torch.Tensor], index: int
) -> torch.Tensor:
    """`newton_schulz` of every whole trailing matrix of a sharded update; this rank's piece of it.

    `update` is this rank's local piece, laid out as `like` (the parameter: mesh, placements,
    global shape). `index` (the matrix's position in the optimizer's step) picks the owner rank;
    every rank of the group must call this for the same matrices in the same order (a collective).
    """
    mesh, placements = like.device_mesh, like.placements
    cuts = _matrix_cuts(like)
    if not cuts:  # every local piece already holds whole matrices (e.g. experts split along E)
        return newton_schulz(update).to(update.dtype)
    if len(cuts) > 1:
        sharded = DTensor.from_local(update, mesh, placements, shape=like.shape, stride=like.stride())
        whole = sharded.redistribute(mesh, _whole_matrices(placements, like.ndim))
        ortho = newton_schulz(whole.to_local()).to(update.dtype)
        result = DTensor.from_local(ortho, mesh, whole.placements, shape=like.shape, stride=like.stride())
        return result.redistribute(mesh, placements).to_local()
    ((mesh_dim, dim),) = cuts
    group = mesh.get_group(mesh_dim)
    size, me = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    owner = index % size
    owner_rank = dist.get_global_rank(group, owner)
    n = like.shape[dim]
    chunk = math.ceil(n / size)
    lengths = [max(0, min(chunk, n - r * chunk)) for r in range(size)]
    padded = _pad(update, dim, chunk)

    pieces = [torch.empty_like(padded) for _ in range(size)] if me == owner else None
    dist.gather(padded, pieces, dst=owner_rank, group=group)
    results: list[torch.Tensor] | None = None
    if pieces is not None:
        whole_local = torch.cat([p.narrow(dim, 0, length) for p, length in zip(pieces, lengths, strict=True)], dim)
        ortho_whole = newton_schulz(whole_local).to(update.dtype)
        starts = [r * chunk for r in range(size)]
        results = [
            _pad(ortho_whole.narrow(dim, min(start, n), length), dim, chunk)
            for start, length in zip(starts, lengths, strict=True)
        ]
    mine = torch.empty_like(padded)
    dist.scatter(mine, results, src=owner_rank, group=group)
    return mine.narrow(dim, 0, update.shape[dim])
