"""Losses computed inside the forward pass: cross-entropy + z-loss and the sequence-wise aux loss.

They live beside the model (not in trinity/optim) because the forward computes them without
extra passes; trinity.optim.balancing re-exports them next to the bias updates.

Legend: B batch, T sequence, V vocabulary, E routed experts, K top-k.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


class _CrossEntropyZ(torch.autograd.Function):
    """CE and z-loss from one logsumexp; the backward builds softmax once for both gradients.

    d/dlogits of mean CE is (softmax - onehot) / n; of mean lse^2 it is 2 lse softmax / n.
    """

    @staticmethod
    def forward(ctx: Any, logits_NV: torch.Tensor, labels_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid_N = labels_N != IGNORE_INDEX
        safe_labels_N = labels_N.clamp(min=0)
        n_valid = valid_N.sum().clamp(min=1).float()
        logits_f = logits_NV.float()
        lse_N = torch.logsumexp(logits_f, dim=-1)
        target_N = logits_f.gather(1, safe_labels_N[:, None]).squeeze(1)
        ce = ((lse_N - target_N) * valid_N).sum() / n_valid
        z = (lse_N.square() * valid_N).sum() / n_valid
        ctx.save_for_backward(logits_NV, lse_N, safe_labels_N, valid_N, n_valid)
        return ce, z

    @staticmethod
    def backward(ctx: Any, g_ce: torch.Tensor | None, g_z: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        logits_NV, lse_N, labels_N, valid_N, n_valid = ctx.saved_tensors
        g_ce = torch.zeros((), device=lse_N.device) if g_ce is None else g_ce
        g_z = torch.zeros((), device=lse_N.device) if g_z is None else g_z
        weight_N = valid_N / n_valid
        grad_NV = (logits_NV.float() - lse_N[:, None]).exp_()
        grad_NV.mul_(((g_ce + 2 * g_z * lse_N) * weight_N)[:, None])
        grad_NV.scatter_add_(1, labels_N[:, None], -(g_ce * weight_N)[:, None])
        return grad_NV.to(logits_NV.dtype), None


def cross_entropy_and_z(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean logsumexp^2) over tokens whose label is not IGNORE_INDEX.

    One logsumexp in fp32 serves both: CE_t = lse_t - logit_t[label_t], z_t = lse_t^2 (PAPER.md 3:
    the z-loss term is w * mean_t lse_t^2; the weight w is applied by the caller).
    With no valid label both are 0 (not NaN), so an all-padding micro-batch contributes nothing.
    """
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    ce, z = _CrossEntropyZ.apply(logits_NV, labels_BT.reshape(-1))  # type: ignore[no-untyped-call]
    return ce, z


def z_loss(logits_NV: torch.Tensor) -> torch.Tensor:
    """Unweighted z-loss of all rows: mean_t logsumexp(logits_t)^2 (fp32)."""
    return torch.logsumexp(logits_NV.float(), dim=-1).square().mean()


def sequence_aux_loss(scores_BTE: torch.Tensor, topk_ids_BTK: torch.Tensor) -> torch.Tensor:
    """Sequence-wise balance loss, unweighted (PAPER.md 3), averaged over the B sequences.

    f_i = E / (K T) * #tokens of the sequence whose top-k (on biased scores) contains i, constant;
    P_i = mean_t s_ti / sum_j s_tj (gradient flows here); loss = sum_i f_i P_i.
    Perfectly uniform routing and scores give exactly 1.
    """
    B, T, E = scores_BTE.shape
    K = topk_ids_BTK.shape[-1]
    with torch.no_grad():
        counts_BE = torch.zeros(B, E, dtype=torch.float32, device=scores_BTE.device)
        counts_BE.scatter_add_(1, topk_ids_BTK.reshape(B, T * K), torch.ones(B, T * K, device=scores_BTE.device))
        f_BE = counts_BE * (E / (K * T))
    p_BE = (scores_BTE.float() / scores_BTE.float().sum(-1, keepdim=True)).mean(dim=1)
    return (f_BE * p_BE).sum(-1).mean()
