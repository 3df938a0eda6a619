"""The fast MoE path against the dense reference, and routing against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from trinity.model.moe import MoE, MoEReference


def make_pair(seed: int, E: int = 6, K: int = 2, shared: int = 1) -> tuple[MoE, MoEReference]:
    torch.manual_seed(seed)
    fast = MoE(16, n_experts=E, top_k=K, expert_hidden=12, n_shared_experts=shared, route_scale=2.5)
    for p in fast.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fast.expert_bias.normal_(0, 0.1)
    ref = MoEReference(16, n_experts=E, top_k=K, expert_hidden=12, n_shared_experts=shared, route_scale=2.5)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("seed,E,K,shared", [(0, 6, 2, 1), (1, 8, 3, 2), (2, 4, 4, 0), (3, 16, 1, 1)])
def test_fast_equals_reference_forward_and_gradients(seed: int, E: int, K: int, shared: int) -> None:
    fast, ref = make_pair(seed, E, K, shared)
    x = torch.randn(3, 11, 16)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, counts_f, aux_f = fast(x_fast)
    out_r, counts_r, aux_r = ref(x_ref)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts_f, counts_r)
    assert counts_f.sum().item() == 3 * 11 * K
    g = torch.randn_like(out_f)
    (out_f * g).sum().add(aux_f).backward()
    (out_r * g).sum().add(aux_r).backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for (name, pf), pr in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pr.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_bias_selects_but_does_not_gate() -> None:
    """Hand-computed: sigmoid(0)=0.5, sigmoid(ln 3)=0.75; the bias flips the choice, gates stay unbiased."""
    moe = MoE(2, n_experts=3, top_k=2, expert_hidden=4, route_scale=2.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0], [-10.0, 0.0]]))
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # expert 2 is chosen only thanks to its bias
    scores, ids, gates = moe.route(torch.tensor([[1.0, 0.0]]))
    assert sorted(ids[0].tolist()) == [1, 2]
    s2 = torch.sigmoid(torch.tensor(-10.0)).item()
    want = {1: 2.0 * 0.75 / (0.75 + s2), 2: 2.0 * s2 / (0.75 + s2)}
    for e, g in zip(ids[0].tolist(), gates[0].tolist(), strict=True):
        assert g == pytest.approx(want[e], rel=1e-6)
    assert scores.dtype == torch.float32


def test_bf16_inputs_route_in_fp32() -> None:
    fast, _ = make_pair(4)
    fast = fast.to(torch.bfloat16)
    fast.expert_bias.data = fast.expert_bias.float()
    out, _, _ = fast(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    scores, _, _ = fast.route(torch.randn(4, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and scores.dtype == torch.float32


def test_expert_keys_and_old_flat_checkpoints_load() -> None:
    """Experts live at `experts.*`; a state dict with the pre-GroupedExperts flat names loads into the same place."""
    fast, _ = make_pair(5)
    sd = fast.state_dict()
    assert {"experts.w1_EFD", "experts.w3_EFD", "experts.w2_EDF"} <= set(sd)
    flat = {k.removeprefix("experts."): v for k, v in sd.items()}
    fresh = MoE(16, n_experts=6, top_k=2, expert_hidden=12, route_scale=2.5)
    fresh.load_state_dict(flat)  # strict: every key is consumed
    for name, value in sd.items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_autocast_runs_experts_in_bf16_close_to_fp32() -> None:
    """Under bf16 autocast the grouped expert matmuls run in bf16 (as autocast's nn.Linear would;
    the grouped kernel is not on autocast's list) and the result stays within bf16 rounding of the
    fp32 reference; routing stays fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[tuple[str, torch.dtype]] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.__name__.split(".")[0]
            if name in ("_grouped_mm", "mm") and isinstance(args[0], torch.Tensor):
                self.seen.add((name, args[0].dtype))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(5)
    fast = MoE(32, n_experts=4, top_k=2, expert_hidden=16, n_shared_experts=1, route_scale=2.0)
    for p in fast.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref = MoEReference(32, n_experts=4, top_k=2, expert_hidden=16, n_shared_experts=1, route_scale=2.0)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 9, 32)
    want, counts_want, _ = ref(x)
    with MatmulDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        got, counts_got, _ = fast(x.clone().requires_grad_())
    assert torch.equal(counts_got, counts_want)
    assert ("_grouped_mm", torch.bfloat16) in seen.seen or ("mm", torch.bfloat16) in seen.seen
    assert ("_grouped_mm", torch.float32) not in seen.seen
    torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=0)
