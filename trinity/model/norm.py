"""RMSNorm, computed in fp32 whatever the activation dtype (PAPER.md 2).

Legend: B batch, T sequence, D normalised width (d_model, or head_dim for QK-norm).
"""

from __future__ import annotations

import torch
from torch import nn


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
        xf_BTD = x_BTD.float()
        inv_rms_BT1 = torch.rsqrt(xf_BTD.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * (xf_BTD * inv_rms_BT1)).to(x_BTD.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
