"""What one forward pass returns to the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrinityOutput:
    """Everything training needs from one forward pass (no second pass required).

    logits: [B, T, V] in the model dtype.
    ce_loss: mean cross-entropy over labels != -100 (None without labels).
    z_loss_term: unweighted mean_t logsumexp(logits_t)^2 over the same tokens (None without labels).
    expert_counts: int64 [n_moe_layers, E], tokens routed to each expert on the BIASED top-k, for
        the bias update (sum over micro-batches and ranks, then `update_expert_biases`) and MaxVio.
    aux_loss_per_layer: fp32 [n_moe_layers], the unweighted sequence-wise aux loss of each MoE layer
        (mean over sequences). Combine with `trinity.optim.balancing.combine_aux_loss(x, reduce)` and
        multiply by StabilitySpec.aux_loss_weight.
    """

    logits: torch.Tensor
    ce_loss: torch.Tensor | None
    z_loss_term: torch.Tensor | None
    expert_counts: torch.Tensor
    aux_loss_per_layer: torch.Tensor
