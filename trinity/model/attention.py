"""Gated grouped-query attention with QK-norm: sliding-window RoPE (local) or full causal NoPE (global).

PAPER.md 2: q, k, v from the normed input; per-head RMSNorm on q and k; RoPE only on local
layers; local layers see keys s with t - w + 1 <= s <= t, global layers all s <= t; an
elementwise sigmoid gate from the same normed input multiplies the concatenated heads before W_o.

Memory: no float T x T mask is ever built. Without document ids, global layers (and local ones
when T <= w) call SDPA with `is_causal=True` (a fused kernel, O(T) memory). Local layers with
T > w are computed blockwise: queries in blocks of C tokens (C <= w), each attending to the C + w
keys that can reach it, with one boolean [C, C + w] band mask per block shared by all heads;
scores cost O(T * w) per head, linear in T. Only global layers with document ids need a boolean
[B, 1, T, T] mask (1 byte per pair, shared by heads).

Legend: B batch, T sequence, D d_model, H query heads, G kv heads, K head_dim,
N query blocks, C block length (<= w), S keys per block (= C + w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trinity.model.norm import RMSNorm
from trinity.model.rope import apply_rope

_PAD_DOC = -1  # document id of padding; real ids must be >= 0


@dataclass
class AttentionMasks:
    """Masks shared by all layers of one forward pass (built once, not per layer or head).

    `local_BN1CS` is None when local layers can use plain causal SDPA; `global_B1TT` is None when
    global layers can (no document ids).
    """

    window: int
    local_BN1CS: torch.Tensor | None
    global_B1TT: torch.Tensor | None


def build_attention_masks(
    T: int, window: int, doc_ids_BT: torch.Tensor | None, block: int | None = None
) -> AttentionMasks:
    """Boolean masks (True = may attend) for a batch of length-T sequences.

    `block` is the query block length C of local layers (default `default_block(window)`).
    """
    global_mask = None
    if doc_ids_BT is not None:
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
        same_doc_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
        global_mask = (same_doc_BTT & causal_TT)[:, None]
    if window >= T:
        # The window covers the whole sequence: local layers are plain causal (+ documents).
        return AttentionMasks(window, None, global_mask)

    C = block or default_block(window)
    N = -(-T // C)
    device = doc_ids_BT.device if doc_ids_BT is not None else None
    docs_BT = doc_ids_BT if doc_ids_BT is not None else torch.zeros(1, T, dtype=torch.long, device=device)
    # Keys of block n are positions [n*C - w, n*C + C); key j of block n sits at n*C - w + j and
    # query i at n*C + i, so the window t - w < s <= t becomes i < j <= i + w.
    i_C1 = torch.arange(C, device=device)[:, None]
    j_1S = torch.arange(C + window, device=device)[None, :]
    band_CS = (j_1S > i_C1) & (j_1S <= i_C1 + window)
    # Padding (before the start and after the end) gets doc id -1 so it never matches a real token.
    q_docs_BNC = F.pad(docs_BT, (0, N * C - T), value=_PAD_DOC).view(-1, N, C)
    k_docs_BNS = F.pad(docs_BT, (window, N * C - T), value=_PAD_DOC).unfold(1, C + window, C)
    local_mask = band_CS & (q_docs_BNC[..., :, None] == k_docs_BNS[..., None, :])
    return AttentionMasks(window, local_mask[:, :, None], global_mask)


def default_block(window: int) -> int:
    """Query block length of local layers: each query block reads C + w keys, so scores cost
    T (C + w) instead of the T w needed; smaller C wastes less compute but copies K and V
    (C + w) / C times. w / 4 (at least 16) measured fastest on CPU."""
    return max(16, window // 4) if window >= 64 else window


def _blockwise_local_attention(
    q_BHTK: torch.Tensor, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor, mask_BN1CS: torch.Tensor, window: int
) -> torch.Tensor:
    """Sliding-window attention computed per query block of C tokens against its C + w keys."""
    B, H, T, K = q_BHTK.shape
    G = k_BGTK.shape[1]
    N, C, S = mask_BN1CS.shape[1], mask_BN1CS.shape[-2], mask_BN1CS.shape[-1]
    pad_tail = N * C - T
    q_BNHCK = F.pad(q_BHTK, (0, 0, 0, pad_tail)).view(B, H, N, C, K).transpose(1, 2)
    # unfold gives [B, G, N, K, S]: windows of S keys every C positions (a copy of ~2x K and V).
    k_BNGSK = F.pad(k_BGTK, (0, 0, window, pad_tail)).unfold(2, S, C).permute(0, 2, 1, 4, 3)
    v_BNGSK = F.pad(v_BGTK, (0, 0, window, pad_tail)).unfold(2, S, C).permute(0, 2, 1, 4, 3)
    mask = mask_BN1CS.expand(B, -1, -1, -1, -1).reshape(B * N, 1, C, S)
    out = F.scaled_dot_product_attention(
        q_BNHCK.reshape(B * N, H, C, K),
        k_BNGSK.reshape(B * N, G, S, K),
        v_BNGSK.reshape(B * N, G, S, K),
        attn_mask=mask,
        enable_gqa=True,
    )
    return out.view(B, N, H, C, K).transpose(1, 2).reshape(B, H, N * C, K)[:, :, :T]


class Attention(nn.Module):
    """One attention sublayer; `is_local` selects sliding-window + RoPE vs full causal NoPE."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        is_local: bool,
        qk_norm: bool = True,
        gated: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.is_local = is_local
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wg = nn.Linear(d_model, n_heads * head_dim, bias=False) if gated else None
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def forward(
        self, x_BTD: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor], masks: AttentionMasks
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTHK = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k_BTGK = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        v_BGTK = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
        q_BHTK, k_BGTK = q_BTHK.transpose(1, 2), k_BTGK.transpose(1, 2)

        if self.is_local:
            cos, sin = rope_cos_sin
            q_BHTK, k_BGTK = apply_rope(q_BHTK, cos, sin), apply_rope(k_BGTK, cos, sin)
            if masks.local_BN1CS is not None:
                o_BHTK = _blockwise_local_attention(q_BHTK, k_BGTK, v_BGTK, masks.local_BN1CS, masks.window)
            else:  # T <= w: the window is the whole causal past
                o_BHTK = self._sdpa(q_BHTK, k_BGTK, v_BGTK, masks.global_B1TT)
        else:
            o_BHTK = self._sdpa(q_BHTK, k_BGTK, v_BGTK, masks.global_B1TT)

        o_BTX = o_BHTK.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if self.wg is not None:
            o_BTX = o_BTX * torch.sigmoid(self.wg(x_BTD))
        out_BTD: torch.Tensor = self.wo(o_BTX)
        return out_BTD

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_B1TT: torch.Tensor | None) -> torch.Tensor:
        if mask_B1TT is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TT, enable_gqa=True)
