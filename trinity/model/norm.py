"""RMSNorm, computed in fp32 whatever the activation dtype (PAPER.md 2).

Legend: B batch, T sequence, D normalised width (d_model, or head_dim for QK-norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        # torch's fused rms_norm: one kernel forward and backward instead of five elementwise ops.
        y_BTD = F.rms_norm(x_BTD.float(), (x_BTD.shape[-1],), self.weight.float(), self.eps)
        return y_BTD.to(x_BTD.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
