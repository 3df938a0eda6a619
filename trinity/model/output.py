"""What one forward pass returns to the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class TrinityOutput:
    """Everything training needs from one forward pass (no second pass required).

    ce_loss: mean cross-entropy over labels != -100 (None without labels).
    z_loss_term: unweighted mean_t logsumexp(logits_t)^2 over the same tokens (None without labels).
    expert_counts: int64 [n_moe_layers, E], tokens routed to each expert on the BIASED top-k, for
        the bias update (sum over micro-batches and ranks, then `update_expert_biases`) and MaxVio.
    aux_loss_per_layer: fp32 [n_moe_layers], the unweighted sequence-wise aux loss of each MoE layer
        (mean over sequences). Combine with `trinity.optim.balancing.combine_aux_loss(x, reduce)` and
        multiply by StabilitySpec.aux_loss_weight.
    hidden_BTD: the final-normed hidden states, the head's input.
    head_weight_VD: the head weight the forward used.
    logits (property): [B, T, V]. Computed in the forward when it had no labels (or was asked for
        them); with labels the loss is fused with the head and the logits are computed on first
        access from hidden_BTD and head_weight_VD (differentiable, in hidden_BTD's dtype).
    """

    ce_loss: torch.Tensor | None
    z_loss_term: torch.Tensor | None
    expert_counts: torch.Tensor
    aux_loss_per_layer: torch.Tensor
    hidden_BTD: torch.Tensor
    head_weight_VD: torch.Tensor
    logits_BTV: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        if self.logits_BTV is None:
            self.logits_BTV = F.linear(self.hidden_BTD, self.head_weight_VD.to(self.hidden_BTD.dtype))
        return self.logits_BTV
