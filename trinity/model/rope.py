"""Rotary position embedding of the local (sliding-window) layers (PAPER.md 2).

Global layers use no positional encoding at all, so only local layers call `apply_rope`.
The half-split ("rotate_half") convention matches transformers' afmoe, so weights transfer
without permuting q/k rows.

Legend: B batch, T sequence, H heads, K head_dim (Dh), F head_dim / 2 frequencies.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for given positions; inverse frequencies are a non-persistent buffer."""

    inv_freq_F: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponent_F = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq_F", 1.0 / (theta**exponent_F), persistent=False)

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, T, Dh] (broadcast over heads), computed in fp32 then cast."""
        freqs_BTF = position_ids_BT[..., None].float() * self.inv_freq_F.to(position_ids_BT.device)
        angles_BTK = torch.cat((freqs_BTF, freqs_BTF), dim=-1)
        return angles_BTK.cos().to(dtype)[:, None], angles_BTK.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTK: torch.Tensor, cos_B1TK: torch.Tensor, sin_B1TK: torch.Tensor) -> torch.Tensor:
    """Rotate query or key vectors by their positions' angles."""
    return x_BHTK * cos_B1TK + _rotate_half(x_BHTK) * sin_B1TK


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
