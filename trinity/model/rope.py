"""Rotary position embedding of the local (sliding-window) layers (PAPER.md 2).

Global layers use no positional encoding at all, so only local layers call `apply_rope`.
The half-split ("rotate_half") convention matches transformers' afmoe, so weights transfer
without permuting q/k rows: with x = [x1, x2] (halves of the head dimension) and the angles'
cos c and sin s,
    rope(x) = [x1 c - x2 s, x2 c + x1 s].
`apply_rope` computes this directly on the two halves (no rotated copy, no concatenation) in
one autograd function whose backward is the inverse rotation.

Legend: B batch, T sequence, H heads, K head_dim (Dh), F head_dim / 2 frequencies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for given positions; inverse frequencies are a non-persistent buffer."""

    inv_freq_F: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq_F", self._inv_freq(torch.get_default_device()), persistent=False)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        exponent_F = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponent_F)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the inverse frequencies in place: a model built on `meta` and materialised with
        `to_empty` holds garbage there (the buffer is not saved, so no checkpoint restores it).
        Computed on the CPU and copied, so every device gets the same bits (as transformers does)."""
        self.inv_freq_F.copy_(self._inv_freq(torch.device("cpu")))

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, 1, F] (one value per frequency, broadcast over heads of a
        [B, T, H, K] tensor), computed in fp32 then cast."""
        freqs_BTF = position_ids_BT[..., None].float() * self.inv_freq_F.to(position_ids_BT.device)
        return freqs_BTF.cos().to(dtype)[:, :, None], freqs_BTF.sin().to(dtype)[:, :, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[x1 c - x2 s, x2 c + x1 s] into a fresh tensor, half by half."""
    F = x.shape[-1] // 2
    x1, x2 = x[..., :F], x[..., F:]
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    o1, o2 = out[..., :F], out[..., F:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        # A rotation's inverse is the rotation by the opposite angle.
        return _rotate(g, cos, -sin).to(ctx.x_dtype), None, None


def apply_rope(x_BTHK: torch.Tensor, cos_BT1F: torch.Tensor, sin_BT1F: torch.Tensor) -> torch.Tensor:
    """Rotate query or key vectors [B, T, H, K] by their positions' angles (tables from RotaryEmbedding)."""
    out: torch.Tensor = _Rope.apply(x_BTHK, cos_BT1F, sin_BT1F)  # type: ignore[no-untyped-call]
    return out


def positions_from_doc_ids(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document start of a packed sequence.

    A document starts where the doc id differs from the previous token's (and at t = 0), so
    ids need only be distinct between neighbours, not globally unique.
    """
    B, T = doc_ids_BT.shape
    t_BT = torch.arange(T, device=doc_ids_BT.device).expand(B, T)
    starts_BT = torch.ones_like(doc_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    # Index of the most recent document start at or before t, by a running max.
    last_start_BT = torch.where(starts_BT, t_BT, torch.zeros_like(t_BT)).cummax(dim=1).values
    return t_BT - last_start_BT
