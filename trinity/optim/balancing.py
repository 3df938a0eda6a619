"""Expert load balancing (PAPER.md 3): bias updates once per optimizer step, MaxVio, and the losses.

The training loop sums `TrinityOutput.expert_counts` ([n_moe_layers, E]) over all micro-batches
of an optimizer step and over data-parallel ranks (all-reduce), then calls
`update_expert_biases(model, counts_LE, stability.balancing)` once, after (or before) the
optimizer step. It updates each MoE layer's fp32 `expert_bias` (and SMEBU's
`expert_bias_momentum`) in place and returns per-layer MaxVio for telemetry.
n_mean == 0 (no tokens routed) leaves the state untouched and gives MaxVio 0.

Legend: E routed experts, L MoE layers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from trinity.model.losses import cross_entropy_and_z, sequence_aux_loss, z_loss
from trinity.model.moe import MoE
from trinity.spec.stability import Balancing, NoBalancing, SignBalancing, SmebuBalancing

__all__ = [
    "combine_aux_loss",
    "cross_entropy_and_z",
    "max_vio",
    "sequence_aux_loss",
    "sign_update",
    "smebu_update",
    "update_expert_biases",
    "z_loss",
]


@torch.no_grad()
def sign_update(bias_E: torch.Tensor, counts_E: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free update: b_i += gamma * sign(n_mean - n_i), then b re-centred to zero mean."""
    n_E = counts_E.to(torch.float32)
    n_mean = n_E.mean()
    if n_mean.item() == 0:
        return
    bias_E += gamma * torch.sign(n_mean - n_E)
    bias_E -= bias_E.mean()


@torch.no_grad()
def smebu_update(bias_E: torch.Tensor, momentum_E: torch.Tensor, counts_E: torch.Tensor, spec: SmebuBalancing) -> None:
    """SMEBU: v = (n_mean - n)/n_mean; d = lambda tanh(kappa v), centred; m = beta m + (1-beta) d; b += m."""
    n_E = counts_E.to(torch.float32)
    n_mean = n_E.mean()
    if n_mean.item() == 0:
        return
    v_E = (n_mean - n_E) / n_mean
    d_E = spec.lambda_ * torch.tanh(spec.kappa * v_E)
    d_E -= d_E.mean()
    momentum_E.mul_(spec.beta).add_((1 - spec.beta) * d_E)
    bias_E += momentum_E


def max_vio(counts_E: torch.Tensor) -> torch.Tensor:
    """(max_i n_i - n_mean) / n_mean over the last dim (fp32); 0 where n_mean == 0."""
    n = counts_E.to(torch.float32)
    n_mean = n.mean(-1)
    vio = (n.amax(-1) - n_mean) / n_mean.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(n_mean > 0, vio, torch.zeros_like(vio))


def combine_aux_loss(aux_loss_per_layer: torch.Tensor, reduce: Literal["sum", "mean"]) -> torch.Tensor:
    """Per-layer sequence-wise aux losses combined across MoE layers (StabilitySpec.aux_loss_reduce)."""
    if aux_loss_per_layer.numel() == 0:
        return aux_loss_per_layer.sum()
    return aux_loss_per_layer.sum() if reduce == "sum" else aux_loss_per_layer.mean()


def moe_modules(model: nn.Module) -> list[MoE]:
    """The MoE layers of `model` in forward order (the row order of expert_counts)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_biases(model: nn.Module, counts_LE: torch.Tensor, balancing: Balancing) -> torch.Tensor:
    """Apply the configured bias update to every MoE layer once; returns MaxVio per layer [L]."""
    layers = moe_modules(model)
    if counts_LE.shape[0] != len(layers):
        raise ValueError(f"expert_counts has {counts_LE.shape[0]} rows; the model has {len(layers)} MoE layers")
    for moe, counts_E in zip(layers, counts_LE, strict=True):
        counts_E = counts_E.to(moe.expert_bias.device)
        if isinstance(balancing, SmebuBalancing):
            smebu_update(moe.expert_bias, moe.expert_bias_momentum, counts_E, balancing)
        elif isinstance(balancing, SignBalancing):
            sign_update(moe.expert_bias, counts_E, balancing.gamma)
        elif not isinstance(balancing, NoBalancing):
            raise TypeError(f"unknown balancing {balancing!r}")
    return max_vio(counts_LE)
