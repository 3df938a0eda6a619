"""Muon vs torch.optim.Muon (2-D), per-expert equivalence (3-D), the AdamW group vs torch.optim.AdamW.

How the lr scaling is accounted for: torch.optim.Muon with adjust_lr_fn=None ("original")
multiplies the lr of a [A, B] matrix by sqrt(max(1, A / B)), A = fan_out, B = fan_in, and applies
weight decay with the unadjusted lr. That is exactly trinity's lr_scaling='sqrt_fan_ratio', so
the two must agree bit for bit with the same lr. For lr_scaling='none' torch has no equivalent
option, so we compare against torch on wide matrices (A <= B), where its factor is 1.
"""

from __future__ import annotations

import pytest
import torch

from trinity.model import TrinityModel
from trinity.optim import Muon, build_optimizer, lr_multiplier, param_group_names
from trinity.spec.model import ModelSpec
from trinity.spec.optim import OptimSpec


def run_steps(opt_cls: type, shapes: list[tuple[int, ...]], steps: int, **kw: object) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(steps)]
    opt = opt_cls(params, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("nesterov", [True, False])
def test_2d_matches_torch_muon_with_fan_ratio_scaling(nesterov: bool) -> None:
    shapes = [(48, 16), (16, 48), (32, 32)]  # tall (factor sqrt(3)), wide, square
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    ours = run_steps(Muon, shapes, 4, lr_scaling="sqrt_fan_ratio", **kw)
    theirs = run_steps(torch.optim.Muon, shapes, 4, adjust_lr_fn="original", **kw)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_2d_no_scaling_matches_torch_on_wide_matrices() -> None:
    shapes = [(16, 48), (32, 32)]
    ours = run_steps(Muon, shapes, 3, lr=0.05, lr_scaling="none")
    theirs = run_steps(torch.optim.Muon, shapes, 3, lr=0.05)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # ... and on a tall matrix they differ by exactly the missing factor.
    assert lr_multiplier(torch.Size([48, 16]), "sqrt_fan_ratio") == pytest.approx(3**0.5)
    assert lr_multiplier(torch.Size([4, 48, 16]), "none") == 1.0


@pytest.mark.parametrize("shape", [(5, 24, 16), (3, 16, 40)])
def test_3d_step_equals_2d_step_per_expert(shape: tuple[int, int, int]) -> None:
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95)
    (stacked,) = run_steps(Muon, [shape], 3, **kw)
    torch.manual_seed(0)
    init = torch.randn(shape) * 0.1
    grads = [torch.randn(shape) for _ in range(3)]
    experts = [torch.nn.Parameter(init[e].clone()) for e in range(shape[0])]
    opt = Muon(experts, **kw)
    for g in grads:
        for e, p in enumerate(experts):
            p.grad = g[e].clone()
        opt.step()
    # bf16 Newton-Schulz: batched and single matmuls may round differently; updates are ~lr in size.
    torch.testing.assert_close(stacked, torch.stack([p.detach() for p in experts]), atol=2e-4, rtol=0)
    # Not flattened: orthogonalising the [E*A, C] flattening would give a different update.
    flat = run_steps(Muon, [(shape[0] * shape[1], shape[2])], 3, **kw)[0].view(shape)
    assert (flat - stacked).abs().max() > 1e-3


def small_model() -> TrinityModel:
    spec = ModelSpec.model_validate(
        dict(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            n_dense_layers=1,
            n_heads=2,
            n_kv_heads=1,
            head_dim=16,
            dense_hidden=48,
            sliding_window=8,
            moe=dict(n_experts=4, top_k=2, expert_hidden=16),
        )
    )
    return TrinityModel(spec)


@pytest.mark.parametrize("router", ["adamw", "muon"])
def test_groups(router: str) -> None:
    names = param_group_names(small_model(), OptimSpec(router_optimizer=router))
    assert "tok_embeddings.weight" in names["adamw_decay"] and "output.weight" in names["adamw_decay"]
    assert "layers.1.mlp.experts.w1_EFD" in names["muon"] and "layers.0.attn.wq.weight" in names["muon"]
    router_group = "muon_no_decay" if router == "muon" else "adamw_no_decay"
    assert "layers.1.mlp.router.weight" in names[router_group]
    assert not any("router" in n for n in names["muon"] + names["adamw_decay"])
    assert all("norm" in n or n.endswith("router.weight") for n in names["adamw_no_decay"])
    assert not any("expert_bias" in n for ns in names.values() for n in ns)


@pytest.mark.parametrize("router", ["adamw", "muon"])
def test_router_weights_get_no_weight_decay_in_either_optimizer(router: str) -> None:
    """With every gradient zero, a step changes a weight only through decoupled decay: the embedding
    and a hidden matrix shrink by exactly (1 - lr wd), the router stays as it was."""
    torch.manual_seed(0)
    model = small_model()
    spec = OptimSpec(router_optimizer=router, muon={"weight_decay": 0.1, "lr": 0.01}, adamw={"weight_decay": 0.1})
    opt = build_optimizer(model, spec)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    router_w = "layers.1.mlp.router.weight"
    torch.testing.assert_close(params[router_w].detach(), before[router_w], atol=0, rtol=0)
    emb, hidden = "tok_embeddings.weight", "layers.0.attn.wq.weight"
    torch.testing.assert_close(params[emb].detach(), before[emb] * (1 - spec.adamw.lr * 0.1))
    torch.testing.assert_close(params[hidden].detach(), before[hidden] * (1 - spec.muon.lr * 0.1))


def test_adamw_group_matches_torch_adamw_and_lr_factor() -> None:
    torch.manual_seed(0)
    model = small_model()
    spec = OptimSpec()
    opt = build_optimizer(model, spec)
    names = param_group_names(model, spec)
    params = dict(model.named_parameters())
    ref_decay = {n: torch.nn.Parameter(params[n].detach().clone()) for n in names["adamw_decay"]}
    ref_plain = {n: torch.nn.Parameter(params[n].detach().clone()) for n in names["adamw_no_decay"]}
    a = spec.adamw
    ref = torch.optim.AdamW(
        [{"params": list(ref_decay.values())}, {"params": list(ref_plain.values()), "weight_decay": 0.0}],
        lr=a.lr,
        betas=a.betas,
        eps=a.eps,
        weight_decay=a.weight_decay,
    )
    for step in range(3):
        factor = [0.5, 1.0, 0.25][step]
        opt.set_lr_factor(factor)
        for g in ref.param_groups:
            g["lr"] = a.lr * factor
        ids = torch.randint(0, 64, (2, 12))
        opt.zero_grad()
        model(ids, labels_BT=ids).ce_loss.backward()
        for n, p in {**ref_decay, **ref_plain}.items():
            p.grad = params[n].grad.clone()
        opt.step()
        ref.step()
    for n, p in {**ref_decay, **ref_plain}.items():
        torch.testing.assert_close(params[n].detach(), p.detach(), atol=0, rtol=0, msg=n)
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]
