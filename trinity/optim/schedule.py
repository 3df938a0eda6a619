"""Learning-rate multipliers of the peak: pretraining's warmup-stable-decay, and the later stages' rules.

Pretraining (PAPER.md 4): linear warmup over `warmup_steps` optimizer steps, then constant, then a
decay to `final_fraction` of the peak at the end of pretraining, linear or cosine. The decay starts
after `decay_start_tokens` pretraining tokens (across phases) or, when that is not set, over the last
`decay_fraction` of them (`ScheduleSpec.decay_start`). Steps drive the warmup, tokens the decay,
because the batch size changes during training while the decay is planned in tokens.
"""

from __future__ import annotations

import math

from trinity.spec.optim import ScheduleSpec


def decay_shape(progress: float, final: float, kind: str) -> float:
    """From 1 at progress 0 to `final` at progress 1, linearly or along a half cosine."""
    p = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - (1.0 - final) * p


def pretrain_lr_factor(step: int, tokens_seen: int, schedule: ScheduleSpec, total_tokens: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) after `tokens_seen` tokens: 1 after the
    warmup while `tokens_seen` <= the decay start, then decaying with the tokens seen past it."""
    warmup = min(1.0, (step + 1) / schedule.warmup_steps) if schedule.warmup_steps > 0 else 1.0
    decay_start = schedule.decay_start(total_tokens)
    if tokens_seen <= decay_start:
        return warmup
    progress = (tokens_seen - decay_start) / max(total_tokens - decay_start, 1.0)
    return warmup * decay_shape(progress, schedule.final_fraction, schedule.decay)


def rewarm_factor(step: int, total_steps: int, peak_fraction: float, warmup_steps: int) -> float:
    """Warm up linearly to `peak_fraction`, then decay linearly to 0 at `total_steps` (extension, SFT)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_fraction * (step + 1) / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    return peak_fraction * max(0.0, 1.0 - (step - warmup_steps) / remaining)
