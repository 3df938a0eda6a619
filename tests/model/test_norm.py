"""RMSNorm's hand-written forward and backward against autograd through the plain formula."""

from __future__ import annotations

import pytest
import torch

from trinity.model.norm import RMSNorm, rms_norm


def plain(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.double()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.double()).to(x.dtype)


@pytest.mark.parametrize("shape", [(3, 7, 16), (2, 5, 4, 8), (1, 1, 32)])
def test_values_and_gradients_match_the_formula(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3).requires_grad_()
    w = (torch.randn(shape[-1]) + 1).requires_grad_()
    g = torch.randn(*shape)
    got = rms_norm(x, w, 1e-5)
    want = plain(x, w, 1e-5)
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, (x, w), g)
    want_grads = torch.autograd.grad(want, (x, w), g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_non_contiguous_input_and_frozen_weight() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 8, 6).transpose(0, 1).requires_grad_()  # [8, 4, 6], not contiguous
    norm = RMSNorm(6)
    norm.weight.requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    g = torch.randn(8, 4, 6)
    (got,) = torch.autograd.grad(norm(x), x, g)
    (want,) = torch.autograd.grad(plain(x, norm.weight, norm.eps), x, g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert norm.weight.grad is None


def test_bf16_input_stays_bf16_and_is_normalised_in_fp32() -> None:
    torch.manual_seed(2)
    x = torch.randn(5, 64).bfloat16().requires_grad_()
    norm = RMSNorm(64)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, plain(x.float(), norm.weight, norm.eps).bfloat16())
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
