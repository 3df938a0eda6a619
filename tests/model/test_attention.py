"""Attention against a dense, obvious reference: explicit T x T masks, repeat-interleaved KV heads."""

from __future__ import annotations

import math

import pytest
import torch

from trinity.model.attention import Attention, build_attention_masks
from trinity.model.rope import RotaryEmbedding, positions_from_doc_ids


def reference_attention(
    attn: Attention,
    x_BTD: torch.Tensor,
    window: int | None,
    doc_ids_BT: torch.Tensor | None,
    pos_BT: torch.Tensor,
) -> torch.Tensor:
    B, T, _ = x_BTD.shape
    H, G, K = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_norm(attn.wq(x_BTD).view(B, T, H, K)).transpose(1, 2)
    k = attn.k_norm(attn.wk(x_BTD).view(B, T, G, K)).transpose(1, 2)
    v = attn.wv(x_BTD).view(B, T, G, K).transpose(1, 2)
    if window is not None:  # RoPE as transformers writes it: x cos + rotate_half(x) sin, full-width tables
        freqs = pos_BT[..., None].double() / 10_000.0 ** (torch.arange(0, K, 2).double() / K)
        angles = torch.cat([freqs, freqs], -1)[:, None]
        cos, sin = angles.cos().float(), angles.sin().float()

        def rotate_half(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([-t[..., K // 2 :], t[..., : K // 2]], -1)

        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    t = torch.arange(T)
    allowed = t[None, :] <= t[:, None]
    if window is not None:
        allowed &= t[None, :] > t[:, None] - window
    allowed = allowed[None].expand(B, T, T)
    if doc_ids_BT is not None:
        allowed = allowed & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(K)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * K)
    return attn.wo(o * torch.sigmoid(attn.wg(x_BTD)))


@pytest.mark.parametrize("is_local", [True, False])
@pytest.mark.parametrize("T,window", [(37, 8), (16, 8), (5, 8), (64, 16), (9, 8)])
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("block", [None, 3])
def test_attention_matches_dense_reference(
    is_local: bool, T: int, window: int, with_docs: bool, block: int | None
) -> None:
    torch.manual_seed(T + window)
    B, D = 2, 32
    attn = Attention(D, n_heads=4, n_kv_heads=2, head_dim=8, is_local=is_local)
    x = torch.randn(B, T, D)
    docs = torch.sort(torch.randint(0, 3, (B, T)), dim=1).values if with_docs else None
    pos = positions_from_doc_ids(docs) if docs is not None else torch.arange(T)[None].expand(B, T)
    cos_sin = RotaryEmbedding(8, 10_000.0)(pos, x.dtype)
    x.requires_grad_()
    got = attn(x, cos_sin, build_attention_masks(T, window, docs, block=block))
    want = reference_attention(attn, x, window if is_local else None, docs, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Gradients too: the key windows, RoPE and norms have hand-written backwards.
    g = torch.randn_like(got)
    inputs = [x, *attn.parameters()]
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_local_masks_are_linear_in_sequence_length() -> None:
    """No T x T mask without documents: the local mask is [B, (T - w) / C, 1, C, C + w], i.e. O(T * w)."""
    w = 64
    for T in (1024, 4096):
        for block in (None, 64, 16):
            masks = build_attention_masks(T, w, None, block=block)
            C = block or 16
            assert masks.global_B1TT is None
            assert masks.local_BN1CS is not None
            assert masks.local_BN1CS.shape == (1, (T - w) // C, 1, C, C + w)
        assert masks.local_BN1CS.dtype == torch.bool


def test_window_counts_the_current_token() -> None:
    """With w = 2 a token sees itself and exactly one predecessor."""
    masks = build_attention_masks(6, 2, None, block=2)
    assert masks.local_BN1CS is not None and masks.local_BN1CS.shape == (1, 2, 1, 2, 4)
    # Block n holds queries 2 + 2n, 3 + 2n; its keys are positions 2n .. 2n + 3.
    for n in range(2):
        m = masks.local_BN1CS[0, n, 0]
        assert m.tolist() == [[False, True, True, False], [False, False, True, True]]


def test_positions_restart_per_document() -> None:
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_from_doc_ids(docs).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


@pytest.mark.parametrize("is_local", [True, False])
def test_bf16_autocast_close_to_fp32(is_local: bool) -> None:
    """Under bf16 autocast (the recipe's precision) attention stays within bf16 rounding of fp32,
    forward and input gradient, and returns bf16; on CPU the masked (local-block) kernels run in
    fp32, where CPU's flash backward is faster than in bf16."""
    from trinity.model.attention import _kernel_dtype

    torch.manual_seed(3)
    B, T, D, window = 2, 40, 64, 16
    attn = Attention(D, n_heads=4, n_kv_heads=2, head_dim=16, is_local=is_local)
    x = torch.randn(B, T, D, requires_grad=True)
    cos_sin = RotaryEmbedding(16, 10_000.0)(torch.arange(T)[None].expand(B, T), x.dtype)
    masks = build_attention_masks(T, window, None)
    want = attn(x, cos_sin, masks)
    (want_gx,) = torch.autograd.grad(want.sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x, cos_sin, masks)
    (got_gx,) = torch.autograd.grad(got.float().sum(), x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=0)
    torch.testing.assert_close(got_gx, want_gx, atol=2e-2 * want_gx.abs().max().item(), rtol=0)
    q = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    assert _kernel_dtype(q, masked=True) == torch.float32
    assert _kernel_dtype(q, masked=False) == torch.bfloat16
    assert _kernel_dtype(q[..., :32], masked=False) == torch.float32
    assert _kernel_dtype(q.float(), masked=False) == torch.float32
