"""The `optim` section: Muon + AdamW groups, the learning-rate schedule and the batch-size schedule (PAPER.md 4)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from trinity.spec.base import SpecModel, added_field
from trinity.spec.data import MAX_TOKENS
from trinity.spec.rules import Rules

MAX_STEPS = 10**9
"""Optimizer steps of any count (warm-up, RL); Trinity Large pretrained for ~140k."""
MAX_BATCH_SEQUENCES = 2**24
"""Sequences in one global batch (Trinity Large: 16384)."""


class MuonSpec(SpecModel):
    """Muon for hidden 2-D matrices and stacked expert matrices."""

    lr: PositiveFloat = 1e-3
    """Peak learning rate of the Muon group."""
    momentum: float = Field(0.95, ge=0.0, lt=1.0)
    """Momentum coefficient."""
    nesterov: bool = True
    """Nesterov momentum."""
    ns_steps: PositiveInt = Field(5, le=100)
    """Newton-Schulz iterations."""
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    """Quintic Newton-Schulz coefficients (a, b, c) of every iteration, for ns_schedule 'fixed'."""
    ns_schedule: Literal["fixed", "polar_express"] = added_field("fixed")
    """Newton-Schulz coefficients per iteration ([open]: the Trinity report does not say which):
    'fixed' applies ns_coefficients at every iteration (torch.optim.Muon; by default Keller Jordan's
    quintic, which plateaus: singular values from 1e-3 to 1 of the Frobenius norm end in [0.47, 1.20]
    after 5 iterations, and in [0.68, 1.14] from 8 on, never nearer 1); 'polar_express' applies a different
    quintic at each iteration, the worst-case optimal ones of Polar Express (Amsel et al. 2025, arXiv
    2505.16932, Algorithm 1, with its bf16 safety factor 1.01), which converge (the same singular values
    end in [0.84, 1.12] after 5 iterations, [0.993, 1.002] after 6); iterations past its 8 published
    polynomials repeat the last. See trinity.optim.ns_schedule."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Decoupled weight decay ([open])."""
    lr_scaling: Literal["sqrt_fan_ratio", "none"] = "sqrt_fan_ratio"
    """Per-matrix lr multiplier: sqrt(max(1, fan_out / fan_in)) (Trinity) or none."""
    eps: PositiveFloat = 1e-7
    """Added to the Frobenius norm before Newton-Schulz."""
    ns_dtype: Literal["bf16", "fp32"] = "bf16"
    """Precision of Newton-Schulz ([open]): bf16 as torch.optim.Muon (fast on GPUs), or fp32 (CPUs
    without bf16 matrix units; results then agree across parallel layouts to fp32 rounding, where
    in bf16 a rounding flip spreads over the whole matrix)."""

    @model_validator(mode="after")
    def _rules(self) -> MuonSpec:
        rules = Rules()
        rules.check(
            self.ns_schedule == "fixed" or self.ns_coefficients == MuonSpec.model_fields["ns_coefficients"].default,
            "ns_coefficients",
            f"= {self.ns_coefficients} is used only by ns_schedule 'fixed', and ns_schedule is "
            f"{self.ns_schedule!r}: remove ns_coefficients, or set ns_schedule: fixed",
        )
        rules.raise_if_any()
        return self


class AdamWSpec(SpecModel):
    """AdamW for the embedding, the LM head and every 1-D parameter."""

    lr: PositiveFloat = 3e-4
    """Peak learning rate of the AdamW group."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas ([open])."""
    eps: PositiveFloat = 1e-8
    """Adam epsilon ([open])."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Decoupled weight decay for matrices in this group (1-D parameters get none) ([open])."""


DEFAULT_DECAY_FRACTION = 0.2
"""`ScheduleSpec.decay_fraction`'s default: the only value it may hold beside `decay_start_tokens`."""


class ScheduleSpec(SpecModel):
    """Warmup, stable, decay: linear warmup in steps, then constant, then decay over the last tokens.

    Where the decay starts is given in one of two forms: `decay_start_tokens` (pretraining tokens seen,
    across phases) or, when that is None, `decay_fraction` (the last fraction of all pretraining
    tokens). Setting `decay_start_tokens` and a `decay_fraction` other than its default is an error
    (the default stays allowed beside it because a run's saved spec writes every field out).
    """

    warmup_steps: NonNegativeInt = Field(2000, le=MAX_STEPS)
    """Linear warmup from 0 to the peak over this many optimizer steps."""
    decay: Literal["linear", "cosine"] = "linear"
    """Shape of the final decay (Nano/Mini: linear; Large: cosine)."""
    decay_fraction: float = Field(DEFAULT_DECAY_FRACTION, gt=0.0, le=1.0)
    """Fraction of all pretraining tokens, at the end, over which the lr decays ([open]); unused when
    `decay_start_tokens` is set."""
    final_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """The lr at the end of pretraining, as a fraction of the peak (Large: 0.1)."""
    decay_start_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = added_field(None)
    """Pretraining tokens seen (across phases) after which the lr decays, to the end of pretraining;
    must be below the total pretraining tokens. None: the decay covers the last `decay_fraction`."""

    @model_validator(mode="after")
    def _rules(self) -> ScheduleSpec:
        rules = Rules()
        rules.check(
            self.decay_start_tokens is None or self.decay_fraction == DEFAULT_DECAY_FRACTION,
            "decay_fraction",
            f"= {self.decay_fraction} is set together with decay_start_tokens ({self.decay_start_tokens}): both say "
            "where the lr decay starts; keep one: delete decay_fraction to start at the token count, or set "
            "decay_start_tokens to null to use the fraction",
        )
        rules.raise_if_any()
        return self

    def decay_start(self, total_tokens: int) -> float:
        """Pretraining tokens seen after which the lr decays: `decay_start_tokens`, or the start of the last
        `decay_fraction` of `total_tokens`."""
        if self.decay_start_tokens is not None:
            return float(self.decay_start_tokens)
        return (1.0 - self.decay_fraction) * total_tokens


def whole_steps(tokens: int, step_tokens: int) -> int:
    """Optimizer steps of `step_tokens` tokens each that cover `tokens` (the last one whole): ceil, in integers
    (the same as math.ceil(tokens / step_tokens) below 2**53 tokens, exact beyond)."""
    return -(-tokens // step_tokens)


class BatchStep(SpecModel):
    """From `start_tokens` tokens seen on, each optimizer step uses `sequences` sequences."""

    start_tokens: NonNegativeInt = Field(0, le=MAX_TOKENS)
    """Pretraining tokens seen (across phases) when this batch size takes over."""
    sequences: PositiveInt = Field(le=MAX_BATCH_SEQUENCES)
    """Global batch, in sequences, per optimizer step."""


class OptimSpec(SpecModel):
    """Optimizers, the learning-rate schedule and the global batch-size schedule of pretraining."""

    muon: MuonSpec = MuonSpec()
    """The Muon group."""
    adamw: AdamWSpec = AdamWSpec()
    """The AdamW group."""
    router_optimizer: Literal["muon", "adamw"] = "adamw"
    """Which group the router matrix belongs to ([open])."""
    schedule: ScheduleSpec = ScheduleSpec()
    """Learning-rate schedule of pretraining (shared by both groups, as a multiplier of their peaks)."""
    batch: tuple[BatchStep, ...] = Field((BatchStep(sequences=4096),), max_length=1024)
    """Global batch-size schedule by tokens seen; the first entry must start at 0."""

    @model_validator(mode="after")
    def _rules(self) -> OptimSpec:
        rules = Rules()
        rules.check(len(self.batch) > 0, "batch", "must have at least one entry")
        if self.batch:
            rules.check(
                self.batch[0].start_tokens == 0,
                ("batch", 0, "start_tokens"),
                f"= {self.batch[0].start_tokens} must be 0 (the first batch size applies from the start)",
            )
        for i in range(1, len(self.batch)):
            rules.check(
                self.batch[i].start_tokens > self.batch[i - 1].start_tokens,
                ("batch", i, "start_tokens"),
                f"= {self.batch[i].start_tokens} must be greater than the previous entry's "
                f"({self.batch[i - 1].start_tokens})",
            )
        rules.raise_if_any()
        return self

    def batch_sequences_at(self, tokens_seen: int) -> int:
        """Global batch (sequences) in force after `tokens_seen` pretraining tokens."""
        current = self.batch[0].sequences
        for step in self.batch:
            if tokens_seen >= step.start_tokens:
                current = step.sequences
        return current

    def batch_steps(self, tokens_seen: int, tokens: int, seq_len: int) -> tuple[int, int]:
        """Optimizer steps that train `tokens` more tokens at `seq_len` from `tokens_seen` on, and the
        tokens seen after them.

        Each step takes the batch in force when it starts (`batch_sequences_at`) for the whole step,
        and steps continue while fewer than `tokens_seen + tokens` tokens are seen: the last step is
        whole, so the budget is met or overshot, and a step that starts before an entry's
        `start_tokens` and ends past it keeps the old batch. Closed form of that loop: the schedule is
        piecewise constant, so each piece (up to the next entry's start or the budget's end) takes
        ceil(remaining / step tokens) steps.
        """
        end = tokens_seen + tokens
        seen, steps, i = tokens_seen, 0, 0
        while seen < end:
            while i + 1 < len(self.batch) and self.batch[i + 1].start_tokens <= seen:
                i += 1
            step_tokens = self.batch[i].sequences * seq_len
            until = end if i + 1 == len(self.batch) else min(end, self.batch[i + 1].start_tokens)
            n = whole_steps(until - seen, step_tokens)
            steps, seen = steps + n, seen + n * step_tokens
        return steps, seen
