"""Gated grouped-query attention with QK-norm: sliding-window RoPE (local) or full causal NoPE (global).

PAPER.md 2: q, k, v from the normed input; per-head RMSNorm on q and k; RoPE only on local
layers; local layers see keys s with t - w + 1 <= s <= t, global layers all s <= t; an
elementwise sigmoid gate from the same normed input multiplies the concatenated heads before W_o.

Memory: no float T x T mask is ever built. Without document ids, global layers (and local ones
when T <= w) call SDPA with `is_causal=True` (a fused kernel, O(T) memory). Local layers with
T > w split the queries in two: the first w see their whole causal past, so they are one causal
SDPA call over the first w tokens; the rest are computed blockwise, queries in blocks of C tokens
(C <= w), each attending to the J C >= C + w keys that can reach it (J = 1 + ceil(w / C)), with
one boolean [C, J C] band mask per block shared by all heads; scores cost O(T * w) per head,
linear in T, and no block reads keys before the sequence start. Only global layers with
document ids need a boolean [B, 1, T, T] mask (1 byte per pair, shared by heads).

Layout: q, k, v stay [B, T, heads, K] (the projections' layout) throughout; SDPA gets transposed
views, which is the layout CPU's flash kernel works in, so no head-major copies are made. The
key/value windows of the blocks are gathered by `key_windows` (one copy forward, a sum of J
shifted slices backward).

Legend: B batch, T sequence, D d_model, H query heads, G kv heads, K head_dim,
N query blocks, C block length (<= w), J key blocks per query block, S keys per block (= J C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trinity.model.norm import RMSNorm
from trinity.model.rope import apply_rope

_PAD_DOC = -1  # document id of padding; real ids must be >= 0


@dataclass
class AttentionMasks:
    """Masks shared by all layers of one forward pass (built once, not per layer or head).

    `local_BN1CS` (the band masks of the query blocks t >= w) is None when local layers can use
    plain causal SDPA (T <= w); `global_B1TT` is None when global layers can (no document ids).
    """

    window: int
    local_BN1CS: torch.Tensor | None
    global_B1TT: torch.Tensor | None
    block: int = 0


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

    C = min(block or default_block(window), window)
    J = 1 + -(-window // C)
    N = -(-(T - window) // C)
    device = doc_ids_BT.device if doc_ids_BT is not None else None
    docs_BT = doc_ids_BT if doc_ids_BT is not None else torch.zeros(1, T, dtype=torch.long, device=device)
    # Query i of block n sits at w + n*C + i; its keys are positions [n*C, n*C + J*C), key j at
    # n*C + j, so the window t - w < s <= t becomes i < j <= i + w.
    i_C1 = torch.arange(C, device=device)[:, None]
    j_1S = torch.arange(J * C, device=device)[None, :]
    band_CS = (j_1S > i_C1) & (j_1S <= i_C1 + window)
    # Padding after the end gets doc id -1 so it never matches a real token.
    q_docs_BNC = F.pad(docs_BT[:, window:], (0, N * C - (T - window)), value=_PAD_DOC).view(-1, N, C)
    k_docs_BNS = F.pad(docs_BT, (0, (N + J - 1) * C - T), value=_PAD_DOC).unfold(1, J * C, C)
    local_mask = band_CS & (q_docs_BNC[..., :, None] == k_docs_BNS[..., None, :])
    return AttentionMasks(window, local_mask[:, :, None], global_mask, C)


def default_block(window: int) -> int:
    """Query block length of local layers: each query block reads C + w keys, so scores cost
    T (C + w) instead of the T w needed; smaller C wastes less compute but copies K and V
    (C + w) / C times. w / 4 (at least 16) measured fastest on CPU."""
    return max(16, window // 4) if window >= 64 else window


class _KeyWindows(torch.autograd.Function):
    """Windows of J consecutive C-row blocks, block n = rows [n C, (n + J) C) of x (zero past its end).

    [B, T, G, K] -> [B * N, J * C, G, K]. Backward: each input block sums its J window slices.
    """

    @staticmethod
    def forward(ctx: Any, x_BTGK: torch.Tensor, N: int, C: int, J: int) -> torch.Tensor:
        B, T, G, K = x_BTGK.shape
        L = (N + J - 1) * C
        blocks = F.pad(x_BTGK, (0, 0, 0, 0, 0, L - T)).view(B, N + J - 1, C, G, K)
        out = x_BTGK.new_empty(B, N, J, C, G, K)
        for j in range(J):
            out[:, :, j] = blocks[:, j : j + N]
        ctx.shape = (B, T, N, C, J)
        return out.view(B * N, J * C, G, K)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        B, T, N, C, J = ctx.shape
        G, K = g.shape[-2:]
        g_BNJCGK = g.reshape(B, N, J, C, G, K)
        grad = g.new_zeros(B, N + J - 1, C, G, K)
        for j in range(J):
            grad[:, j : j + N] += g_BNJCGK[:, :, j]
        return grad.view(B, (N + J - 1) * C, G, K)[:, :T], None, None, None


def key_windows(x_BTGK: torch.Tensor, N: int, C: int, J: int) -> torch.Tensor:
    """[B * N, J * C, G, K]: for each query block n, rows [n C, (n + J) C) of x (zeros past the end)."""
    out: torch.Tensor = _KeyWindows.apply(x_BTGK, N, C, J)  # type: ignore[no-untyped-call]
    return out


def _kernel_dtype(q: torch.Tensor, masked: bool) -> torch.dtype:
    """The dtype SDPA runs in: q's, except on CPU in bf16 where the flash kernel's backward is
    slower than its fp32 one (measured on a 2-core AMX Xeon, torch 2.13, fwd + bwd: masked
    [8, 8, 128, 64] x 640 keys 56 vs 43 ms; causal head_dim 32 x 512 tokens 41 vs 30 ms) unless
    the blocks are long, unmasked and head_dim >= 64 (causal 1024 x 64: 50 vs 73 ms)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and (masked or q.shape[-1] < 64):
        return torch.float32
    return q.dtype


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """SDPA on [batch, heads, len, K] (GQA), in `_kernel_dtype`; returns q's dtype."""
    dtype = _kernel_dtype(q, mask is not None)
    # Autocast would cast fp32 inputs back down; the dtype is chosen here instead.
    with torch.autocast(q.device.type, enabled=False):
        q2, k2, v2 = q.to(dtype), k.to(dtype), v.to(dtype)
        o = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, is_causal=causal, enable_gqa=True)
    return o.to(q.dtype)


def _sdpa(
    q_BTHK: torch.Tensor, k_BTGK: torch.Tensor, v_BTGK: torch.Tensor, mask_B1TT: torch.Tensor | None
) -> torch.Tensor:
    """Causal (or masked) attention on [B, T, heads, K] tensors; returns [B, T, H, K]."""
    q, k, v = q_BTHK.transpose(1, 2), k_BTGK.transpose(1, 2), v_BTGK.transpose(1, 2)
    return _flash(q, k, v, mask_B1TT, causal=mask_B1TT is None).transpose(1, 2)


def _band_attention(
    q_BQHK: torch.Tensor, k_BTGK: torch.Tensor, v_BTGK: torch.Tensor, mask_BN1CS: torch.Tensor, C: int
) -> torch.Tensor:
    """Queries w..T-1 (Q of them) in blocks of C, each against its J C keys from position n C on."""
    B, Q, H, K = q_BQHK.shape
    N, S = mask_BN1CS.shape[1], mask_BN1CS.shape[-1]
    q_BNHCK = F.pad(q_BQHK, (0, 0, 0, 0, 0, N * C - Q)).view(B * N, C, H, K).transpose(1, 2)
    k_BNGSK = key_windows(k_BTGK, N, C, S // C).transpose(1, 2)
    v_BNGSK = key_windows(v_BTGK, N, C, S // C).transpose(1, 2)
    mask = mask_BN1CS.expand(B, -1, -1, -1, -1).reshape(B * N, 1, C, S)
    o = _flash(q_BNHCK, k_BNGSK, v_BNGSK, mask, causal=False)
    return o.transpose(1, 2).reshape(B, N * C, H, K)[:, :Q]


def local_attention(
    q_BTHK: torch.Tensor, k_BTGK: torch.Tensor, v_BTGK: torch.Tensor, masks: AttentionMasks
) -> torch.Tensor:
    """Sliding-window attention: queries t < w are plainly causal, the rest go by blocks."""
    if masks.local_BN1CS is None:  # T <= w: the window is the whole causal past
        return _sdpa(q_BTHK, k_BTGK, v_BTGK, masks.global_B1TT)
    w = masks.window
    first_mask = masks.global_B1TT[:, :, :w, :w] if masks.global_B1TT is not None else None
    first_BWHK = _sdpa(q_BTHK[:, :w], k_BTGK[:, :w], v_BTGK[:, :w], first_mask)
    rest_BQHK = _band_attention(q_BTHK[:, w:], k_BTGK, v_BTGK, masks.local_BN1CS, masks.block)
    return torch.cat([first_BWHK, rest_BQHK], dim=1)


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

    def project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q_BTHK, k_BTGK, v_BTGK, gate logits_BTX or None), q and k normed (no RoPE yet).

        The q, k, v (and gate) projections run as one matmul against their concatenated weights:
        one larger GEMM instead of four (two of them narrow), and one GEMM for the input gradient
        instead of four plus three additions; the parameters stay separate (names, interop, Muon).
        """
        B, T, _ = x_BTD.shape
        H, G, K = self.n_heads, self.n_kv_heads, self.head_dim
        linears = [self.wq, self.wk, self.wv] + ([self.wg] if self.wg is not None else [])
        w_XD = torch.cat([lin.weight for lin in linears])
        parts = F.linear(x_BTD, w_XD).split([lin.out_features for lin in linears], dim=-1)  # type: ignore[no-untyped-call]
        q_BTHK, k_BTGK, v_BTGK = parts[0].view(B, T, H, K), parts[1].view(B, T, G, K), parts[2].view(B, T, G, K)
        if self.q_norm is not None and self.k_norm is not None:
            q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
        return q_BTHK, k_BTGK, v_BTGK, parts[3] if self.wg is not None else None

    def forward(
        self, x_BTD: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor], masks: AttentionMasks
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTHK, k_BTGK, v_BTGK, gate_BTX = self.project(x_BTD)

        if self.is_local:
            cos, sin = rope_cos_sin
            q_BTHK, k_BTGK = apply_rope(q_BTHK, cos, sin), apply_rope(k_BTGK, cos, sin)
            o_BTHK = local_attention(q_BTHK, k_BTGK, v_BTGK, masks)
        else:
            o_BTHK = _sdpa(q_BTHK, k_BTGK, v_BTGK, masks.global_B1TT)

        o_BTX = o_BTHK.reshape(B, T, self.n_heads * self.head_dim)
        if gate_BTX is not None:
            o_BTX = o_BTX * torch.sigmoid(gate_BTX)
        out_BTD: torch.Tensor = self.wo(o_BTX)
        return out_BTD
