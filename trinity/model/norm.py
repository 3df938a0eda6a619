"""RMSNorm, computed in fp32 whatever the activation dtype (PAPER.md 2).

CPU has no fused RMSNorm kernel (F.rms_norm decomposes into pow / mean / rsqrt / mul and autograd
differentiates each), so the forward and backward are written out here: the forward computes the
reciprocal rms once and saves it, the backward uses the closed form
    dx = rstd * (w g - xhat * mean(w g xhat)),   dw = sum_rows g xhat,   xhat = x * rstd,
with as few [.., D] temporaries as possible.

Legend: B batch, T sequence, D normalised width (d_model, or head_dim for QK-norm), N rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w on fp32 rows [..., D]; saves x and rstd."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
        D = x.shape[-1]
        # vector_norm is one fused reduction (no x^2 temporary): rstd = 1 / sqrt(|x|^2 / D + eps).
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
        rstd = sq.div_(D).add_(eps).rsqrt_()
        ctx.save_for_backward(x, w_D, rstd)
        y: torch.Tensor = (x * rstd).mul_(w_D)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w_D, rstd = ctx.saved_tensors
        D = x.shape[-1]
        # One [.., D] temporary (fresh allocations cost page faults on CPU): gx = g * x serves
        # dw = sum_rows gx * rstd and the row dots (gx . w) * rstd as two matrix-vector products,
        # then holds dx = rstd * (g w) - x * rstd^3 (gx . w) / D.
        gx = g * x
        gx_ND, rstd_N = gx.reshape(-1, D), rstd.reshape(-1)
        grad_w = gx_ND.t() @ rstd_N if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            coef = (gx_ND @ w_D).view_as(rstd).mul_(rstd.pow(3)).div_(-D)
            grad_x = torch.mul(g, w_D, out=gx).mul_(rstd).addcmul_(x, coef)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, in fp32, cast back to x's dtype."""
    y: torch.Tensor = _RMSNormFn.apply(x.float(), weight_D.float(), eps)  # type: ignore[no-untyped-call]
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), statistics and gain applied in fp32.

    The gain is kept in fp32 too; the result is cast back to the input's dtype so a bf16
    model stays bf16 between norms (the same order of operations as transformers' AfmoeRMSNorm,
    which keeps the exported model exact).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return rms_norm(x_BTD, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
