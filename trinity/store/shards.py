"""Where the pieces of a DTensor lie in its global array, who writes each, and the chunk grid that
gives every writer chunks of its own.

A DTensor of global shape G lives on a device mesh of shape M with one placement per mesh dim:
Replicate() (every coordinate along that dim holds the same data) or Shard(d) (tensor dim d is
split along that mesh dim with torch's chunk semantics: pieces of ceil(n / k), the last ones
smaller or empty). Mesh dims are applied left to right, so two Shard(d) on one tensor dim nest.
Every rank's local piece is then a rectangle: an offset and a shape in G.

A checkpoint stores a DTensor as one Zarr array of shape G. The piece at mesh coordinate c is
written once: by the coordinate whose index is 0 on every Replicate() dim (the replicas stay
silent). The chunk shape is the largest piece's shape, so that each non-empty piece is exactly
one chunk (the last ones clipped by the array's edge) and no two writers ever touch one chunk
file. Layouts where that does not hold (nested Shard(d) with uneven pieces) are refused, naming
the leaf, the placements and the rank whose piece straddles chunks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def is_dtensor(value: object) -> TypeGuard[DTensor]:
    return isinstance(value, DTensor)


@dataclass(frozen=True)
class Layout:
    """How one DTensor is laid out: its global shape, its mesh and, per mesh dim, the tensor dim it
    shards (None: replicated)."""

    path: str
    global_shape: tuple[int, ...]
    mesh_shape: tuple[int, ...]
    mesh_dim_names: tuple[str, ...] | None
    shard_dims: tuple[int | None, ...]
    ranks: tuple[int, ...]  # global rank of each mesh coordinate, row-major

    @property
    def placements(self) -> list[str]:
        return ["R" if d is None else f"S({d})" for d in self.shard_dims]

    def rank_at(self, coord: tuple[int, ...]) -> int:
        flat = 0
        for c, n in zip(coord, self.mesh_shape, strict=True):
            flat = flat * n + c
        return self.ranks[flat]

    def record(self) -> dict[str, Any]:
        """JSON for the checkpoint's layout attribute (what `trinity explain`-style displays show)."""
        return {
            "mesh_shape": list(self.mesh_shape),
            "mesh_dim_names": None if self.mesh_dim_names is None else list(self.mesh_dim_names),
            "placements": self.placements,
        }


def layout_of(path: str, dt: DTensor) -> Layout:
    """The layout of `dt`; a ValueError naming `path` for placements that are not rectangles
    (Partial sums, strided shards)."""
    mesh: DeviceMesh = dt.device_mesh
    shard_dims: list[int | None] = []
    for i, p in enumerate(dt.placements):
        if type(p) is Replicate:
            shard_dims.append(None)
        elif type(p) is Shard:
            shard_dims.append(p.dim if p.dim >= 0 else p.dim + dt.ndim)
        else:
            raise ValueError(
                f"{path}: placement {p} on mesh dim {i} cannot be checkpointed; allowed are Replicate() and "
                f"Shard(d) (reduce a Partial() with .redistribute(placements=...) before saving)"
            )
    return Layout(
        path=path,
        global_shape=tuple(dt.shape),
        mesh_shape=tuple(mesh.shape),
        mesh_dim_names=None if mesh.mesh_dim_names is None else tuple(mesh.mesh_dim_names),
        shard_dims=tuple(shard_dims),
        ranks=tuple(int(r) for r in mesh.mesh.flatten().tolist()),
    )


def _split(size: int, k: int, i: int) -> tuple[int, int]:
    """(offset, length) of piece i of `size` split into k with torch's chunk semantics."""
    step = -(-size // k)
    start = min(step * i, size)
    return start, min(size, start + step) - start


def piece(layout: Layout, coord: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) of the piece at mesh coordinate `coord`."""
    offset = [0] * len(layout.global_shape)
    shape = list(layout.global_shape)
    for mesh_dim, d in enumerate(layout.shard_dims):
        if d is None:
            continue
        start, length = _split(shape[d], layout.mesh_shape[mesh_dim], coord[mesh_dim])
        offset[d] += start
        shape[d] = length
    return tuple(offset), tuple(shape)


def is_writer(layout: Layout, coord: tuple[int, ...]) -> bool:
    """Whether the rank at `coord` writes its piece: index 0 on every replicated mesh dim."""
    return all(c == 0 for c, d in zip(coord, layout.shard_dims, strict=True) if d is None)


def chunk_shape(layout: Layout) -> tuple[int, ...]:
    """The chunk shape that makes every non-empty piece exactly one chunk; a ValueError naming the
    leaf, its placements and a rank whose piece would share a chunk with another's."""
    g = layout.global_shape
    chunks: list[int] = []
    for d in range(len(g)):
        mesh_dims = [m for m, s in enumerate(layout.shard_dims) if s == d]
        # The pieces along tensor dim d depend on the coordinates along these mesh dims only.
        spans: list[tuple[tuple[int, ...], int, int]] = []
        for sub in itertools.product(*(range(layout.mesh_shape[m]) for m in mesh_dims)):
            at = [0] * len(layout.mesh_shape)
            for m, i in zip(mesh_dims, sub, strict=True):
                at[m] = i
            offsets, shape = piece(layout, tuple(at))
            spans.append((tuple(at), offsets[d], shape[d]))
        c = max(1, max(n for _, _, n in spans))
        for coord, off, n in spans:
            if n and (off % c or n != min(c, g[d] - off)):
                rank = layout.rank_at(coord)
                raise ValueError(
                    f"{layout.path}: placements {layout.placements} on mesh {list(layout.mesh_shape)} give rank {rank} "
                    f"the slice [{off}:{off + n}] of dim {d}, which is not one chunk of {c} (the largest piece): two "
                    f"ranks would write one chunk. Allowed: at most one uneven split per tensor dim (one Shard(d) "
                    f"per dim, or nested Shard(d) whose pieces divide evenly)"
                )
        chunks.append(c)
    return tuple(chunks)


@dataclass(frozen=True)
class LocalPiece:
    """This rank's piece of a DTensor: where it lies, and whether this rank writes it."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    writer: bool

    @property
    def empty(self) -> bool:
        return 0 in self.shape

    def region(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.shape, strict=True))


def local_piece(layout: Layout, dt: DTensor) -> LocalPiece:
    """This rank's piece of `dt`, checked against torch's own geometry (a clear error if they differ)."""
    coord_list = dt.device_mesh.get_coordinate()
    if coord_list is None:  # this rank is not part of the mesh: it holds nothing
        return LocalPiece((0,) * len(layout.global_shape), (0,) * len(layout.global_shape), False)
    coord = tuple(int(c) for c in coord_list)
    offset, shape = piece(layout, coord)
    t_shape, t_offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    local_shape = tuple(dt.to_local().shape)
    if tuple(t_shape) != shape or local_shape != shape or (0 not in shape and tuple(t_offset) != offset):
        raise ValueError(
            f"{layout.path}: the local piece of rank coordinate {list(coord)} is {list(local_shape)} at "
            f"{list(t_offset)} per torch, but the checkpoint's geometry expects {list(shape)} at {list(offset)} "
            f"(placements {layout.placements}, mesh {list(layout.mesh_shape)})"
        )
    return LocalPiece(offset, shape, is_writer(layout, coord))


def region_of(path: str, global_shape: tuple[int, ...], like: DTensor) -> tuple[slice, ...]:
    """The rectangle of a stored array of `global_shape` that this rank holds in `like`'s layout."""
    if tuple(like.shape) != tuple(global_shape):
        raise ValueError(
            f"{path}: the checkpoint holds shape {list(global_shape)}, the target layout expects {list(like.shape)}"
        )
    layout_of(path, like)  # refuses non-rectangular placements
    if like.device_mesh.get_coordinate() is None:
        return tuple(slice(0, 0) for _ in global_shape)
    shape, offset = compute_local_shape_and_global_offset(global_shape, like.device_mesh, like.placements)
    return tuple(slice(o, o + n) if n else slice(0, 0) for o, n in zip(offset, shape, strict=True))


def as_dtensor(local: torch.Tensor, like: DTensor) -> DTensor:
    """`local` (this rank's rectangle) as a DTensor with `like`'s mesh, placements and global shape."""
    shape = tuple(like.shape)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    local = local.to(like.to_local().device)
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )
