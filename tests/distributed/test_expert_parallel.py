"""Expert parallelism on real gloo ranks against the single-process MoE on the same weights and tokens.

Each rank runs the EP MoE on its own tokens; the test process recomputes everything with one
process: outputs and counts per rank, expert gradients of the summed loss of the ep group (a
rank's local experts see every rank's tokens), router/shared/input gradients of the rank's own
loss, and the all-to-all byte counters from the routing counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

from trinity.distributed.expert_parallel import apply_expert_parallel, local_part, read_stats, reset_stats
from trinity.distributed.testing import run_workers
from trinity.model.moe import MoE, MoEReference

pytestmark = pytest.mark.slow  # multi-rank: gloo processes

D, F = 16, 12


@dataclass
class Case:
    """One MoE, one token batch per rank, and the weights of each rank's loss sum(out * g) + aux."""

    name: str
    ep: int
    n_experts: int
    top_k: int
    shared: int
    state: dict[str, torch.Tensor]
    x: list[torch.Tensor]  # per rank, [B, T, D] (shapes may differ between ranks)
    g: list[torch.Tensor]  # per rank, like x
    fsdp: bool = False  # also FSDP2 over the 3-D training mesh, as trinity.distributed.mesh lays it out


def build(case: Case, cls: type[MoE] = MoE) -> MoE:
    moe = cls(
        D, n_experts=case.n_experts, top_k=case.top_k, expert_hidden=F, n_shared_experts=case.shared, route_scale=2.5
    )
    moe.load_state_dict(case.state)
    return moe


def make_case(
    name: str, world: int, ep: int, E: int, K: int, shared: int, seed: int, hot: tuple[int, ...] = ()
) -> Case:
    """Random weights; experts in `hot` get a bias of +10 so every token picks them (uneven routing)."""
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(D, n_experts=E, top_k=K, expert_hidden=F, n_shared_experts=shared)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        moe.expert_bias.copy_(torch.randn(E, generator=gen) * 0.1)
        for e in hot:
            moe.expert_bias[e] = 10.0
    shapes = [(2 + r % 2, 5 + 2 * r, D) for r in range(world)]  # every rank a different token count
    x = [torch.randn(s, generator=gen) for s in shapes]
    g = [torch.randn(s, generator=gen) for s in shapes]
    return Case(name, ep, E, K, shared, moe.state_dict(), x, g)


def ep_worker(rank: int, world: int, cases: list[Case]) -> list[dict[str, Any]]:
    """Run every case with expert parallelism on this rank; rank = dp_index * ep + ep_index."""
    out = []
    for case in cases:
        moe = build(case)
        if case.fsdp:
            dims = ("replicate", "shard_mod_ep", "ep")
            mesh = init_device_mesh("cpu", (1, world // case.ep, case.ep), mesh_dim_names=dims)
            mesh["shard_mod_ep", "ep"]._flatten("shard")
            apply_expert_parallel(moe, mesh["ep"])
            fully_shard(moe.experts, mesh=mesh["replicate", "shard_mod_ep"], shard_placement_fn=lambda p: Shard(1))
            fully_shard(moe, mesh=mesh["replicate", "shard"])
            for m in (moe.experts, moe):  # gradients: the mean over all ranks; gloo has no PREMUL_SUM
                m.set_gradient_divide_factor(float(world))  # type: ignore[operator]
                m.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
        else:
            apply_expert_parallel(
                moe, init_device_mesh("cpu", (world // case.ep, case.ep), mesh_dim_names=("dp", "ep"))["ep"]
            )
        reset_stats()
        x = case.x[rank].clone().requires_grad_()
        y, counts, aux = moe(x)
        ((y * case.g[rank]).sum() + aux).backward()
        part = (lambda t: t.full_tensor()) if case.fsdp else local_part
        grads = {n: part(p.grad).clone() for n, p in moe.named_parameters() if p.grad is not None}
        out.append({"y": y.detach(), "counts": counts, "x_grad": x.grad, "grads": grads, "stats": read_stats()})
    return out


def check(case: Case, results: list[dict[str, Any]]) -> None:
    P = case.ep
    L = case.n_experts // P
    for cls in (MoE, MoEReference):
        # Forward and own-loss gradients (router, shared expert, input) per rank.
        own: list[dict[str, torch.Tensor]] = []
        for r, res in enumerate(results):
            ref = build(case, cls)
            x = case.x[r].clone().requires_grad_()
            y, counts, aux = ref(x)
            ((y * case.g[r]).sum() + aux).backward()
            torch.testing.assert_close(res["y"], y.detach(), atol=1e-5, rtol=1e-5, msg=f"{case.name} rank {r} out")
            assert torch.equal(res["counts"], counts), f"{case.name} rank {r}: counts"
            torch.testing.assert_close(res["x_grad"], x.grad, atol=1e-5, rtol=1e-5, msg=f"{case.name} rank {r} x.grad")
            own.append({n: p.grad for n, p in ref.named_parameters() if p.grad is not None})
            for n, gr in own[-1].items():
                if not n.startswith("experts."):
                    torch.testing.assert_close(res["grads"][n], gr, atol=1e-5, rtol=1e-5, msg=f"{case.name} r{r} {n}")
        # Expert gradients: the summed loss of the rank's ep group, sliced to the rank's experts.
        for r, res in enumerate(results):
            group = range(r - r % P, r - r % P + P)
            lo = (r % P) * L
            for n in ("experts.w1_EFD", "experts.w3_EFD", "experts.w2_EDF"):
                want = torch.stack([own[q][n] for q in group]).sum(0)[lo : lo + L]
                torch.testing.assert_close(res["grads"][n], want, atol=1e-5, rtol=1e-5, msg=f"{case.name} r{r} {n}")


def check_fsdp(case: Case, results: list[dict[str, Any]]) -> None:
    """Under FSDP each rank holds the full gradients of the mean loss over all ranks."""
    ref = build(case)
    total = torch.zeros(())
    for r, res in enumerate(results):
        y, counts, aux = ref(case.x[r])
        torch.testing.assert_close(res["y"], y.detach(), atol=1e-5, rtol=1e-5, msg=f"{case.name} rank {r} out")
        assert torch.equal(res["counts"], counts)
        total = total + (y * case.g[r]).sum() + aux
    (total / len(results)).backward()
    for r, res in enumerate(results):
        for n, p in ref.named_parameters():
            torch.testing.assert_close(res["grads"][n], p.grad, atol=1e-5, rtol=1e-5, msg=f"{case.name} r{r} {n}")


def check_stats(case: Case, results: list[dict[str, Any]]) -> None:
    """Bytes leaving/entering each rank, from the routing counts alone (rows to oneself are not sent)."""
    P = case.ep
    L = case.n_experts // P
    for r, res in enumerate(results):
        group = list(range(r - r % P, r - r % P + P))
        me = r % P
        to_others = sum(int(res["counts"][p * L : (p + 1) * L].sum()) for p in range(P) if p != me)
        from_others = sum(int(results[q]["counts"][me * L : (me + 1) * L].sum()) for q in group if q != r)
        rows = (to_others + from_others) * D * 4
        counts_bytes = (P - 1) * L * 8
        s = res["stats"]
        assert (s["forward_calls"], s["backward_calls"]) == (3, 2)
        assert s["forward_bytes_sent"] == rows + counts_bytes and s["forward_bytes_received"] == rows + counts_bytes
        assert s["backward_bytes_sent"] == rows and s["backward_bytes_received"] == rows
        assert s["forward_seconds"] > 0 and s["backward_seconds"] > 0


def error_messages(world: int) -> list[str]:
    """What apply_expert_parallel says to E % ep != 0, to a model without MoE, and when applied twice."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    messages = []
    twice = MoE(D, n_experts=4, top_k=1, expert_hidden=F)
    apply_expert_parallel(twice, mesh)
    for model in (MoE(D, n_experts=3, top_k=1, expert_hidden=F), torch.nn.Linear(2, 2), twice):
        try:
            apply_expert_parallel(model, mesh)
        except ValueError as e:
            messages.append(str(e))
    return messages


def two_rank_worker(rank: int, world: int, cases: list[Case]) -> tuple[list[dict[str, Any]], list[str]]:
    return ep_worker(rank, world, cases), error_messages(world)


def test_two_ranks_match_single_process() -> None:
    cases = [
        make_case("even", world=2, ep=2, E=8, K=2, shared=1, seed=0),
        # Experts 0 and 1 (both on rank 0) take every token: rank 1 receives no rows at all.
        make_case("all-to-rank-0", world=2, ep=2, E=4, K=2, shared=0, seed=1, hot=(0, 1)),
        # One hot expert on rank 1, one random pick: some (rank, expert) pairs get zero rows.
        make_case("skewed", world=2, ep=2, E=6, K=2, shared=2, seed=2, hot=(4,)),
    ]
    results, messages = zip(*run_workers(two_rank_worker, 2, cases), strict=True)
    assert messages[0][0] == (
        "model.moe.n_experts = 3 must be divisible by parallel.ep = 2 (each rank holds E / ep experts)"
    )
    assert "no MoE layer" in messages[0][1] and "already applied" in messages[0][2]
    assert int(results[0][1]["counts"][2:].sum()) == 0 and int(results[1][1]["counts"][2:].sum()) == 0
    assert all(bool((res[2]["counts"][4] > 0).item()) for res in results)
    for i, case in enumerate(cases):
        check(case, [res[i] for res in results])
        check_stats(case, [res[i] for res in results])


def test_four_ranks_ep4_ep2_submesh_and_fsdp() -> None:
    cases = [
        make_case("ep4", world=4, ep=4, E=8, K=3, shared=1, seed=3),
        # Two ep groups {0, 1} and {2, 3}: each group's experts see only its own ranks' tokens.
        make_case("ep2-of-4", world=4, ep=2, E=4, K=2, shared=1, seed=4, hot=(3,)),
        # The training layout: experts Shard(0) over ep, then FSDP2 Shard(1) over shard_mod_ep, then the MoE.
        replace(make_case("fsdp-ep2", world=4, ep=2, E=8, K=2, shared=1, seed=5), fsdp=True),
    ]
    results = run_workers(ep_worker, 4, cases)
    for i, case in enumerate(cases):
        (check_fsdp if case.fsdp else check)(case, [res[i] for res in results])
        check_stats(case, [res[i] for res in results])


def failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise KeyError("rank one is broken")


def test_failing_worker_raises_its_traceback() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*KeyError: 'rank one is broken'"):
        run_workers(failing_worker, 2)
