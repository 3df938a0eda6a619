"""The LM head fused with cross-entropy + z-loss, chunk by chunk of tokens (training's fast path).

`head_cross_entropy_and_z(h_ND, w_VD, labels_N)` equals `cross_entropy_and_z(h_ND @ w_VD.T, labels_N)`
(losses.py) without ever holding the [N, V] logits or their gradient: rows are processed in chunks
of C tokens, and for each chunk the logits, their softmax and the gradient of the loss w.r.t.
them live only in one reused fp32 [C, V] buffer (C = 512 rows: 8 MiB at V = 4096). The gradients
w.r.t. the hidden states and the head weight are computed during the forward, chunk by chunk, as
Liger's fused linear cross-entropy does; the backward only scales them by the incoming gradient.

Two losses, one precomputed gradient. d/dlogits of mean CE is w_n (p_n - onehot_n) and of the mean
z-loss (lse^2) it is 2 w_n lse_n p_n (w_n = 1 / #valid labels, 0 on ignored rows), so the gradient
of g_ce CE + g_z Z is g_ce times that of CE + r Z with r = g_z / g_ce. The forward does not know
g_ce and g_z yet: it precomputes the gradient for the ratio r the previous backward saw (a
`GradRatio` owned by the caller; 0 at first, i.e. CE alone). A training loop whose loss is
ce + z_weight * z always sees the same r, so only its first backward (when z_weight != 0) misses;
a miss is still exact: the backward then recomputes the head's gradient chunk by chunk with the
true g_ce and g_z (one more head matmul and exp per chunk) and remembers the new r.

Legend: N tokens (B*T flattened), D d_model, V vocabulary, C tokens per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from trinity.model.losses import IGNORE_INDEX

CHUNK_ROWS = 512
"""Tokens per chunk. 512 measured fastest on CPU for V = 4096 and 16384 (256 and 1024 were slower):
the weight gradient accumulates one [V, D] product per chunk, so too few rows make that product a
thin, memory-bound matmul; too many spill the [C, V] buffer out of cache."""
MAX_CHUNK_BYTES = 64 * 2**20
"""Cap on the fp32 [C, V] buffer: large vocabularies get fewer rows (at least 16)."""
MAX_GRAD_ROWS_BYTES = 256 * 2**20
"""Cap on the low-precision logit gradients held for the weight gradient (bf16 at V = 16384:
8192 rows; at Trinity's V = 200,192: 670 rows)."""


@dataclass
class GradRatio:
    """g_z / g_ce of the last backward through the fused head loss; the next forward's guess."""

    value: float = 0.0


def chunk_rows(n_rows: int, vocab: int, rows: int = CHUNK_ROWS, max_bytes: int = MAX_CHUNK_BYTES) -> int:
    """Rows per chunk: `rows`, fewer if the fp32 buffer would exceed `max_bytes` (a multiple of 16, >= 16)."""
    rows = min(rows, max(16, max_bytes // (4 * vocab) // 16 * 16))
    return min(rows, n_rows) if n_rows > 0 else rows


_WORKSPACE: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _scratch(name: str, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, vocab] scratch buffer. On CPU it is kept and reused across calls: a fresh buffer of
    this size (32 MiB and more) comes from mmap every time and pays a page fault per 4 KiB on first
    touch, ~10 ms per chunk buffer at V = 16384. Other devices' caching allocators recycle already."""
    if device.type != "cpu":
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    buf = _WORKSPACE.get((name, dtype))
    if buf is None or buf.numel() < rows * vocab:
        buf = _WORKSPACE[(name, dtype)] = torch.empty(rows * vocab, dtype=dtype)
    return buf[: rows * vocab].view(rows, vocab)


def _grad_rows(n_rows: int, vocab: int, max_bytes: int = MAX_GRAD_ROWS_BYTES) -> int:
    """Rows of low-precision logit gradients held before they are folded into the weight gradient."""
    return max(1, min(n_rows, max_bytes // (2 * vocab)))


def _head_pass(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    labels_N: torch.Tensor,
    valid_N: torch.Tensor,
    n_valid: torch.Tensor,
    grad_coefs: tuple[float, float] | None,
    need: tuple[bool, bool],
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(lse_N fp32, target logit_N fp32, grad_h_ND, grad_w_VD fp32) in one chunked pass.

    h_ND and w_VD share a dtype: fp32, or a low-precision compute dtype (autocast), in which
    case the matmuls run in it and the softmax in fp32. grad_coefs (a, b): gradients are those of
    a * mean CE + b * mean lse^2 (None: no gradients). need: whether grad_h and grad_w are wanted.

    The weight gradient is fp32. In fp32 every chunk adds its [V, D] product in place (addmm);
    in low precision the chunks' logit gradients are kept (up to MAX_GRAD_ROWS_BYTES of them)
    and folded in with one [V, D] matmul per group of chunks, because CPU has no mixed-dtype
    addmm and casting and adding a [V, D] product per chunk cost twice the matmul itself.
    """
    N, _ = h_ND.shape
    V = w_VD.shape[0]
    lse_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
    target_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
    want_h = grad_coefs is not None and need[0]
    want_w = grad_coefs is not None and need[1]
    grad_h_ND = torch.empty_like(h_ND) if want_h else None
    # fp32 accumulation of the weight gradient; the first product writes it (no zero fill).
    new_w = torch.empty if N > 0 else torch.zeros
    grad_w_VD = new_w(V, w_VD.shape[1], dtype=torch.float32, device=h_ND.device) if want_w else None
    fp32 = h_ND.dtype == torch.float32
    wt_DV = w_VD.t()
    # One fp32 [C, V] buffer, reused by every chunk and updated in place (no page faults).
    buf_CV = _scratch("logits", rows, V, torch.float32, h_ND.device)
    logits_buf = buf_CV if fp32 else _scratch("logits", rows, V, h_ND.dtype, h_ND.device)
    # Low precision: logit gradients of consecutive chunks, rows [kept_from, start) of h.
    held_rows = max(rows, _grad_rows(N, V))
    held_RV = None if fp32 or grad_w_VD is None else _scratch("held", held_rows, V, h_ND.dtype, h_ND.device)
    kept_from = 0

    def fold(stop: int) -> None:
        """Adds the held rows' product into grad_w (low precision) and empties the holder."""
        nonlocal kept_from
        if grad_w_VD is None or held_RV is None or stop == kept_from:
            return
        product_VD = torch.mm(held_RV[: stop - kept_from].t(), h_ND[kept_from:stop])
        grad_w_VD.add_(product_VD) if kept_from else grad_w_VD.copy_(product_VD)
        kept_from = stop

    row_offsets_C = torch.arange(rows, device=h_ND.device) * V
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        C = stop - start
        h_CD, labels_C = h_ND[start:stop], labels_N[start:stop]
        logits_CV = torch.mm(h_CD, wt_DV, out=logits_buf[:C])
        x_CV = logits_CV if fp32 else buf_CV[:C].copy_(logits_CV)
        # gather checks the labels against V (a label >= V must not land in the next row).
        target_N[start:stop] = x_CV.gather(1, labels_C[:, None]).squeeze(1)
        flat_C = row_offsets_C[:C] + labels_C
        max_C1 = x_CV.amax(dim=-1, keepdim=True)
        sum_C1 = x_CV.sub_(max_C1).exp_().sum(dim=-1, keepdim=True)  # x_CV now holds exp(logit - max)
        lse_C = lse_N[start:stop]
        torch.add(max_C1.squeeze(1), sum_C1.log().squeeze(1), out=lse_C)
        if grad_coefs is None:
            continue
        a, b = grad_coefs
        w_C = valid_N[start:stop] / n_valid
        # dL/dlogits = w (a + 2 b lse) p - a w onehot, with p = exp(logit - max) / sum, in place.
        x_CV.mul_((w_C * (a + 2 * b * lse_C))[:, None] / sum_C1)
        x_CV.view(-1).index_add_(0, flat_C, -a * w_C)
        if held_RV is not None:
            if stop - kept_from > held_RV.shape[0]:
                fold(start)
            g_c = held_RV[start - kept_from : stop - kept_from].copy_(x_CV)
        else:
            g_c = x_CV if fp32 else logits_buf[:C].copy_(x_CV)
        if grad_h_ND is not None:
            torch.mm(g_c, w_VD, out=grad_h_ND[start:stop])
        if grad_w_VD is not None and fp32:
            grad_w_VD.addmm_(g_c.t(), h_CD, beta=1.0 if start else 0.0)
    fold(N)
    return lse_N, target_N, grad_h_ND, grad_w_VD


class _HeadCrossEntropyZ(torch.autograd.Function):
    """(mean CE, mean lse^2) of h @ w^T; gradients precomputed in the forward for the guessed ratio."""

    @staticmethod
    def forward(
        ctx: Any,
        h_ND: torch.Tensor,
        w_VD: torch.Tensor,
        labels_N: torch.Tensor,
        ratio: GradRatio,
        need_h: bool,
        need_w: bool,
        rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The weight arrives as stored (fp32 master) and is cast here, so its gradient is
        # accumulated and returned in fp32 rather than rounded to the compute dtype and back.
        w_cVD = w_VD.to(h_ND.dtype)
        valid_N = labels_N != IGNORE_INDEX
        safe_labels_N = labels_N.clamp(min=0)
        n_valid = valid_N.sum().clamp(min=1).float()
        r = ratio.value
        coefs = (1.0, r) if (need_h or need_w) else None
        lse_N, target_N, grad_h, grad_w = _head_pass(
            h_ND, w_cVD, safe_labels_N, valid_N, n_valid, coefs, (need_h, need_w), rows
        )
        ce = ((lse_N - target_N) * valid_N).sum() / n_valid
        z = (lse_N.square() * valid_N).sum() / n_valid
        ctx.save_for_backward(h_ND, safe_labels_N, valid_N, n_valid, grad_h, grad_w)
        ctx.w_cVD, ctx.w_dtype = w_cVD, w_VD.dtype
        ctx.ratio, ctx.guess, ctx.need, ctx.rows = ratio, r, (need_h, need_w), rows
        return ce, z

    @staticmethod
    def backward(
        ctx: Any, g_ce: torch.Tensor | None, g_z: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None, None]:
        h_ND, labels_N, valid_N, n_valid, grad_h, grad_w = ctx.saved_tensors
        w_VD = ctx.w_cVD
        guess: float = ctx.guess
        if g_ce is not None and is_fake(g_ce):  # a traced plan (FakeTensorMode): no values; a step whose guess held
            a, b = 1.0, guess
        else:
            a = 0.0 if g_ce is None else float(g_ce)
            b = 0.0 if g_z is None else float(g_z)
        if a != 0.0:
            ctx.ratio.value = b / a
        if a == 0.0 and b == 0.0:
            grad_h = torch.zeros_like(h_ND) if grad_h is not None else None
            grad_w = torch.zeros_like(grad_w) if grad_w is not None else None
        elif a != 0.0 and abs(b - guess * a) <= 1e-12 * max(abs(b), abs(a)):
            # The guess held: the precomputed gradients are those of CE + r Z, times a.
            if a != 1.0:
                grad_h = grad_h * a if grad_h is not None else None
                grad_w = grad_w * a if grad_w is not None else None
        else:  # recompute with the true coefficients
            _, _, grad_h, grad_w = _head_pass(h_ND, w_VD, labels_N, valid_N, n_valid, (a, b), ctx.need, ctx.rows)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None, None, None


def head_cross_entropy_and_z(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ratio: GradRatio | None = None,
    rows_per_chunk: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE, mean logsumexp^2) of the logits h @ w^T over labels != IGNORE_INDEX, never
    materialising the logits. Under autocast the head matmuls run in the autocast dtype (as an
    autocast nn.Linear would) and the softmax in fp32.

    `ratio` is the caller's GradRatio (keep one per model so the guess carries across steps);
    None uses a fresh one (guess: CE alone).
    """
    device = h_ND.device.type
    if torch.is_autocast_enabled(device):
        h_ND = h_ND.to(torch.get_autocast_dtype(device))
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h_ND.requires_grad, grad_on and w_VD.requires_grad
    rows = chunk_rows(h_ND.shape[0], w_VD.shape[0], rows_per_chunk)
    with torch.autocast(device, enabled=False):
        ce, z = _HeadCrossEntropyZ.apply(  # type: ignore[no-untyped-call]
            h_ND, w_VD, labels_N, ratio or GradRatio(), need_h, need_w, rows
        )
    return ce, z
