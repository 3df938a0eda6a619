"""The `stability` section: expert load balancing and the losses that keep training stable (PAPER.md 3)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, PositiveFloat, model_validator

from trinity.spec.base import SpecModel, added_field, execution_only


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


class SpikeSpec(SpecModel):
    """Loss-spike detection and what to do about one (language-model training nodes; RL ignores it).

    A step's loss (the global mean, known before the optimizer step) is a spike when the window of the
    previous `window` non-spike losses is full and, for `zscore`, (loss - mean) / std > threshold (std
    of the window, population form; a window with zero spread flags nothing), or, for `ratio`,
    loss / mean > threshold. A spike never enters the window."""

    window: int = Field(100, ge=2, le=1_000_000)
    """How many previous non-spike losses the running mean and std are taken over."""
    kind: Literal["zscore", "ratio"] = "zscore"
    """zscore: (loss - mean) / std > threshold; ratio: loss / mean > threshold."""
    threshold: float = Field(6.0, gt=0.0, le=1e6)
    """The z-score (kind zscore) or the ratio to the running mean (kind ratio, then above 1) a spike exceeds."""
    action: Literal["warn", "skip", "rollback"] = "warn"
    """warn: an event only; skip: drop the step's optimizer update (the batch is consumed); rollback: restart
    from the last committed checkpoint before the spike and skip the data window that caused it."""
    max_actions: int = Field(10, ge=0, le=100_000)
    """More skip or rollback actions than this in one node fail it (the run is unstable, not unlucky)."""

    @model_validator(mode="after")
    def _ratio_above_one(self) -> SpikeSpec:
        if self.kind == "ratio" and self.threshold <= 1.0:
            raise ValueError(
                f"stability.spikes.threshold = {self.threshold} with kind ratio would flag every loss at or above "
                "the running mean; give a ratio above 1 (e.g. 2.0)"
            )
        return self


class AlarmSpec(SpecModel):
    """MoE health alarms: `events` rows (never a change to training) when a layer's routing goes wrong.

    Each alarm fires once when its condition has held for `consecutive` steps, and again only after the
    condition cleared for a step. The defaults flag sustained problems, not the imbalance of the first
    few hundred steps while the expert bias catches up (sign updates move it 1e-3 per step)."""

    max_vio: PositiveFloat | None = Field(1.0, le=1e6)
    """A layer's MaxVio above this (1.0: its busiest expert takes twice its fair share) for `consecutive`
    steps is a `max_vio_alarm` event; None disables it."""
    consecutive: int = Field(100, ge=1, le=1_000_000_000)
    """Steps a condition must hold before its alarm fires (long enough to ignore transients)."""
    dead_experts: bool = True
    """An expert that receives no token for `consecutive` steps is a `dead_expert` event."""
    bias_drift: PositiveFloat | None = Field(0.5, le=1e6)
    """A layer's expert-bias range (max - min) above this is a `bias_drift` event; None disables it. The router
    scores are sigmoids in (0, 1), so a range of 0.5 lets the bias outweigh half the span of any score: the
    balancing fights the router instead of nudging it. (The bias is re-centred to zero mean by both
    balancing rules, so its range, not its mean, is what drifts.)"""


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
    spikes: SpikeSpec = added_field(SpikeSpec())
    """Loss-spike detection and action (warn, skip, rollback); part of identities only when not the default."""
    alarms: AlarmSpec = execution_only(AlarmSpec())
    """MoE alarms (MaxVio, dead experts, bias drift): events only, never in identities."""
