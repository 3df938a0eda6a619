"""Expert parallelism: routed experts split along E over a 1-D `ep` mesh, rows exchanged by all-to-all.

Rank r of the ep mesh keeps whole experts [r*L, (r+1)*L), L = E / ep, as DTensors Shard(0)
(FSDP2 may shard them further along another dim; the forward uses `.to_local()` of whatever
is there). Routing, the sort by expert, the gate-weighted un-sort and the shared expert stay
in `MoE` and see only this rank's tokens. `GroupedExperts.dispatch` does the part in between:

    counts   all_to_all of the [P, L] count matrix: send_PL[p, l] = my rows for expert p*L + l,
             recv_PL[p, l] = rank p's rows for my local expert l
    rows     all_to_all of the sorted rows (uneven splits: row sums of send_PL / recv_PL); they
             arrive grouped by source rank, then local expert
    regroup  permute to (local expert, source rank) order, grouped matmuls on the L local
             experts, permute back
    rows     the reverse all_to_all returns every row to the rank and position it came from

Both row exchanges are autograd functions whose backward is the reverse exchange, so a rank's
expert gradients come from every rank's loss, and router/shared gradients from its own. Every
rank of the ep mesh must run each forward and backward (they are collectives).

Under `trinity.model.moe.balanced_routing()` (traces under FakeTensorMode, which have no data) the
split sizes and the regrouping come from the balanced counts on the host instead of from the
exchanged count matrix: every rank routes the same number of rows to every expert.

Module-level `STATS` counts what the row and count exchanges move and how long they take, per
forward and backward, for benchmarks (`reset_stats`, `read_stats`).

Legend: M rows this rank routes (its tokens x top-k, sorted by global expert), R rows it
receives for its local experts, E experts, P = ep ranks, L = E / P local experts, D d_model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from trinity.model.moe import (
    GroupedExperts,
    MoE,
    balanced_counts,
    permute_rows,
    routing_is_balanced,
    swiglu_grouped,
)

EXPERT_PARAMS = ("w1_EFD", "w3_EFD", "w2_EDF")


@dataclass
class ExchangeStats:
    """All-to-all totals of one phase since the last `reset_stats()` on this rank.

    Bytes count only what leaves (sent) or enters (received) this rank: rows a rank routes to its
    own experts never cross the network. The forward has three exchanges per MoE layer (counts,
    rows out, rows back), the backward two (the row exchanges reversed).
    """

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


@dataclass
class AllToAllStats:
    forward: ExchangeStats = field(default_factory=ExchangeStats)
    backward: ExchangeStats = field(default_factory=ExchangeStats)
    # Time device work too: synchronise CUDA before and after each exchange (costs overlap).
    synchronize_cuda: bool = False


STATS = AllToAllStats()


def reset_stats() -> None:
    """Zero the counters of both phases (keeps `synchronize_cuda`)."""
    STATS.forward, STATS.backward = ExchangeStats(), ExchangeStats()


def read_stats() -> dict[str, float]:
    """{forward,backward}_{calls,bytes_sent,bytes_received,seconds} since the last reset."""
    return {f"{phase}_{k}": v for phase in ("forward", "backward") for k, v in asdict(getattr(STATS, phase)).items()}


def _exchange(
    out: torch.Tensor,
    inp: torch.Tensor,
    out_splits: list[int] | None,
    in_splits: list[int] | None,
    group: Any,
    phase: ExchangeStats,
) -> None:
    """dist.all_to_all_single (even splits when None) along dim 0, timed and counted in `phase`."""
    sync = STATS.synchronize_cuda and inp.is_cuda
    if sync:
        torch.cuda.synchronize(inp.device)
    start = time.perf_counter()
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    if sync:
        torch.cuda.synchronize(inp.device)
    phase.seconds += time.perf_counter() - start
    me, P = dist.get_rank(group), dist.get_world_size(group)
    kept_in = in_splits[me] if in_splits is not None else inp.shape[0] // P
    kept_out = out_splits[me] if out_splits is not None else out.shape[0] // P
    phase.calls += 1
    phase.bytes_sent += (inp.shape[0] - kept_in) * math.prod(inp.shape[1:]) * inp.element_size()
    phase.bytes_received += (out.shape[0] - kept_out) * math.prod(out.shape[1:]) * out.element_size()


class _AllToAllRows(torch.autograd.Function):
    """Rows in_splits[p] of x go to rank p; out_splits[p] rows arrive from rank p. Backward: the reverse."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        _exchange(out, x.contiguous(), out_splits, in_splits, group, STATS.forward)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad_x = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        _exchange(grad_x, grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, STATS.backward)
        return grad_x, None, None, None


def all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Autograd-capable uneven all-to-all along dim 0 (in_splits: rows sent to each rank, in rank order)."""
    out: torch.Tensor = _AllToAllRows.apply(x, out_splits, in_splits, group)  # type: ignore[no-untyped-call]
    return out


def local_part(p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor parameter (the tensor itself when it is not one)."""
    return p.to_local() if isinstance(p, DTensor) else p


class AllToAllDispatch:
    """GroupedExperts.dispatch under expert parallelism: rows to their experts' ranks, experts, rows back."""

    def __init__(self, ep_mesh: DeviceMesh) -> None:
        self.ep_mesh = ep_mesh
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()

    def __call__(self, x_MD: torch.Tensor, counts_E: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
        P = self.ep
        L = counts_E.numel() // P
        send_PL = counts_E.reshape(P, L).contiguous()
        recv_PL = torch.empty_like(send_PL)
        _exchange(recv_PL, send_PL, None, None, self.group, STATS.forward)
        if routing_is_balanced():  # a trace: every rank routes the balanced counts (module docstring)
            counts = balanced_counts(x_MD.shape[0], P * L)
            me = dist.get_rank(self.group)
            send_splits = [sum(counts[p * L : (p + 1) * L]) for p in range(P)]
            recv_splits = [sum(counts[me * L : (me + 1) * L])] * P
            repeats_PL = torch.tensor(counts[me * L : (me + 1) * L] * P, device=x_MD.device)
        else:
            send_splits, recv_splits = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()  # host sync: sizes
            repeats_PL = recv_PL.reshape(-1)
        x_RD = all_to_all_rows(x_MD, recv_splits, send_splits, self.group)
        # Arrived in (source rank, local expert) blocks; the grouped matmul needs (local expert, source rank).
        local_ids_R = (
            torch.arange(L, device=x_MD.device).repeat(P).repeat_interleave(repeats_PL, output_size=sum(recv_splits))
        )
        order_R = torch.argsort(local_ids_R, stable=True)
        inverse_R = torch.argsort(order_R)
        w1_LFD, w3_LFD, w2_LDF = (local_part(getattr(experts, n)) for n in EXPERT_PARAMS)
        if w1_LFD.shape[0] != L:
            raise RuntimeError(f"expert weights hold {w1_LFD.shape[0]} experts on this rank; the ep split needs {L}")
        x_RD = permute_rows(x_RD, order_R, inverse_R)
        y_RD = swiglu_grouped(x_RD, w1_LFD, w3_LFD, w2_LDF, recv_PL.sum(0))
        y_RD = permute_rows(y_RD, inverse_R, order_R)
        return all_to_all_rows(y_RD, send_splits, recv_splits, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over the 1-D `ep_mesh` and switch it to the all-to-all dispatch.

    Rank r keeps experts [r*E/ep, (r+1)*E/ep) of the full weights it holds now (all ranks must
    hold the same full weights: same seed or the same checkpoint); no communication happens here.
    Call before FSDP wrapping and before building the optimizer (the parameters are replaced).
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh must be 1-D (the 'ep' dimension); got dims {ep_mesh.mesh_dim_names}")
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("apply_expert_parallel: the model has no MoE layer (parallel.ep must be 1)")
    for moe in moes:
        experts = moe.experts
        E = experts.n_experts
        if E % ep != 0:
            raise ValueError(
                f"model.moe.n_experts = {E} must be divisible by parallel.ep = {ep} (each rank holds E / ep experts)"
            )
        if experts.dispatch is not None:
            raise ValueError("apply_expert_parallel: expert parallelism is already applied to this model")
        L = E // ep
        for name in EXPERT_PARAMS:
            full = getattr(experts, name)
            local = full.detach().narrow(0, rank * L, L).clone()  # a copy: the full weights can be freed
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.dispatch = AllToAllDispatch(ep_mesh)
