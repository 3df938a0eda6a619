"""The `stability` section: expert load balancing and the losses that keep training stable (PAPER.md 3)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, PositiveFloat

from trinity.spec.base import SpecModel


class SmebuBalancing(SpecModel):
    """SMEBU: soft-clamped, momentum expert-bias updates (Trinity Large)."""

    model_config = ConfigDict(populate_by_name=True)

    kind: Literal["smebu"] = "smebu"
    lambda_: PositiveFloat = Field(5e-4, alias="lambda")
    """Step size of the bias update (written `lambda` in YAML)."""
    beta: float = Field(0.5, ge=0.0, lt=1.0)
    """Momentum coefficient of the bias update."""
    kappa: PositiveFloat = 2.0
    """Soft-clamp sharpness: the normalised violation goes through tanh(kappa * v)."""


class SignBalancing(SpecModel):
    """Aux-loss-free sign update of the expert bias (Trinity Nano and Mini)."""

    kind: Literal["sign"] = "sign"
    gamma: PositiveFloat = 1e-3
    """Bias step: b_i += gamma * sign(n_mean - n_i), then re-centred (TorchTitan's default 1e-3; [open])."""


class NoBalancing(SpecModel):
    """No expert-bias update (the bias stays zero)."""

    kind: Literal["none"] = "none"


Balancing = Annotated[SmebuBalancing | SignBalancing | NoBalancing, Field(discriminator="kind")]


class StabilitySpec(SpecModel):
    """Load balancing, auxiliary losses, masking and clipping."""

    balancing: Balancing = SignBalancing()
    """Expert-bias update applied once per optimizer step: smebu, sign or none."""
    aux_loss_weight: float = Field(0.0, ge=0.0)
    """Weight alpha of the sequence-wise auxiliary balance loss (Large: 1e-4; 0 disables it)."""
    aux_loss_reduce: Literal["sum", "mean"] = "sum"
    """How the per-layer aux losses combine across MoE layers ([open]: sum, as in DeepSeek-V3)."""
    z_loss_weight: float = Field(0.0, ge=0.0)
    """Weight of the z-loss, w * mean_t logsumexp(logits_t)^2 (Large used 1e-6)."""
    intra_document_masking: bool = False
    """In packed sequences a token attends only within its own document."""
    reset_positions_per_document: bool = False
    """With intra-document masking: restart RoPE positions at each document start ([open])."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision of training: bf16 autocast (Trinity: bf16, no fp8) or full fp32 (the CPU tiny run)."""
    grad_clip: PositiveFloat | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping ([open])."""
