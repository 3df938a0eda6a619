"""The checkpoint's DTensor geometry (trinity.store.shards) against torch's own, without processes.

torch's `_compute_local_shape_and_global_offset` takes a mesh shape and a coordinate, so every
coordinate of a layout can be checked here: the pieces match torch's, the writers' pieces tile the
array with one chunk each when the layout is accepted, and a refused layout really has a piece
that straddles the largest piece's chunk grid.
"""

from __future__ import annotations

import itertools
import math

import pytest
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from trinity.store.shards import Layout, chunk_shape, is_writer, piece

R = Replicate()
CASES: list[tuple[tuple[int, ...], tuple[int, ...], tuple[Placement, ...]]] = [
    ((9, 6), (2, 2), (R, Shard(0))),  # HSDP, uneven
    ((5, 6, 4), (2, 2), (Shard(1), Shard(0))),  # experts on (shard_mod_ep, ep)
    ((5, 6, 4), (2, 2, 2), (R, Shard(1), Shard(0))),  # the 3-D expert mesh
    ((3, 6), (4,), (Shard(0),)),  # an empty last piece
    ((2, 3), (8,), (Shard(0),)),  # more ranks than rows: six empty pieces
    ((8, 3), (2, 2), (Shard(0), Shard(0))),  # nested, even: accepted
    ((16, 5), (2, 2, 2), (Shard(0), Shard(0), Shard(0))),
    ((7, 3), (1, 2), (R, Shard(1))),
    ((0, 4), (2,), (Shard(0),)),  # an empty tensor
    ((), (2, 2), (R, R)),  # a 0-d tensor
]
REFUSED = [
    ((6, 3), (2, 2), (Shard(0), Shard(0))),  # nested, uneven: 3 rows split 2 + 1
    ((10, 4), (2, 2), (Shard(0), Shard(0))),  # 5 rows split 3 + 2
]


def layout(shape: tuple[int, ...], mesh: tuple[int, ...], placements: tuple[Placement, ...]) -> Layout:
    dims = tuple(p.dim if isinstance(p, Shard) else None for p in placements)
    return Layout("w", shape, mesh, None, dims, tuple(range(math.prod(mesh))))


@pytest.mark.parametrize(("shape", "mesh", "placements"), CASES + REFUSED)
def test_pieces_match_torch_and_writers_own_whole_chunks(
    shape: tuple[int, ...], mesh: tuple[int, ...], placements: tuple[Placement, ...]
) -> None:
    lay = layout(shape, mesh, placements)
    coords = list(itertools.product(*(range(n) for n in mesh)))
    pieces = {}
    for c in coords:
        t_shape, t_offset = _compute_local_shape_and_global_offset(shape, mesh, list(c), list(placements))
        offset, size = piece(lay, c)
        assert size == tuple(t_shape), c
        if 0 not in size:
            assert offset == tuple(t_offset), c
        pieces[c] = (offset, size)
    # The largest piece as chunk: does every non-empty piece fill exactly one chunk?
    grid = tuple(max(1, *(s[d] for _, s in pieces.values())) for d in range(len(shape)))
    aligned = all(
        o % g == 0 and n == min(g, total - o)
        for off, size in pieces.values()
        if 0 not in size
        for o, n, g, total in zip(off, size, grid, shape, strict=True)
    )
    assert aligned == ((shape, mesh, placements) not in REFUSED)
    if not aligned:
        with pytest.raises(ValueError, match=r"w: placements .* two ranks would write one chunk"):
            chunk_shape(lay)
        return
    assert chunk_shape(lay) == grid
    owned = [pieces[c] for c in coords if is_writer(lay, c) and 0 not in pieces[c][1]]
    keys = [tuple(o // g for o, g in zip(off, grid, strict=True)) for off, _ in owned]
    assert len(set(keys)) == len(keys)  # no chunk has two writers
    assert sum(math.prod(s) for _, s in owned) == math.prod(shape)  # and together they cover the array
    # Replicas do not write: one writer per distinct piece.
    assert len(owned) == len({p for p in pieces.values() if 0 not in p[1]})
