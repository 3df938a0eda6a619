"""What ranks agree on once per optimizer step: the gradient norm, expert counts, BatchHet, stopping.

Every function is a collective (all ranks call it in the same order) and a plain local
computation when torch.distributed is not initialised, so the trainer has one code path.
Collectives run on the backend's device (NCCL: this rank's GPU, gloo: the CPU); results come back
on the device of the input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from trinity.distributed.device import collective_device


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def _copies(grad: DTensor) -> int:
    """How many ranks hold each element of a DTensor's local pieces (its replicated mesh dims)."""
    mesh = grad.device_mesh
    return math.prod(mesh.size(i) for i, pl in enumerate(grad.placements) if isinstance(pl, Replicate))


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Global L2 norm of all gradients (sharded or not), then scale them so it is at most `max_norm`.

    Each rank sums the squares of its local pieces, divided by the number of ranks holding the same
    piece (replicas), and one all-reduce adds the ranks up: correct for any mix of meshes (dense
    parameters over ("replicate", "shard"), experts over ("replicate", "shard_mod_ep", "ep")).
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else collective_device()
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if isinstance(g, DTensor):
            total_sq += g.to_local().double().pow(2).sum() / _copies(g)
        else:
            total_sq += g.double().pow(2).sum() / world_size()  # a plain gradient is the same on every rank
    if distributed():
        total_sq = total_sq.to(collective_device())
        dist.all_reduce(total_sq)
    norm = math.sqrt(float(total_sq))
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return norm


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of `t` over all ranks (expert counts: every rank then applies the same bias update)."""
    if distributed():
        device = t.device
        t = t.to(collective_device(), copy=True)
        dist.all_reduce(t)
        t = t.to(device)
    return t


def gather_floats(values: list[float]) -> list[float]:
    """Every rank's `values`, concatenated in rank order (each rank passes the same count)."""
    if not distributed():
        return list(values)
    local = torch.tensor(values, dtype=torch.float64, device=collective_device())
    out = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [float(v) for t in out for v in t.tolist()]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (stop requests, non-finite losses)."""
    if not distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if distributed():
        dist.barrier()
