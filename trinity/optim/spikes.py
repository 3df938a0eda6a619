"""Loss-spike detection: is this step's loss far above the running window of recent losses?

`SpikeDetector.check(step, loss)` decides for one optimizer step, from the step's global mean loss
(every rank sees the same value, so every rank decides alike). The rule (stability.spikes):

    window  the previous `window` losses that were not spikes (a spike never enters it, so one
            spike does not raise the bar for the next); nothing is flagged until it is full
    zscore  (loss - mean) / std > threshold, std the population standard deviation of the window;
            a window with zero spread flags nothing
    ratio   loss / mean > threshold

The detector's whole state (the window, and the spikes it flagged with the action taken) is a small dict of
plain numbers, `state_dict()`, that the training checkpoint holds, so a resumed node decides exactly
as an uninterrupted one would: the arithmetic is plain Python floats in a fixed order (math.fsum),
no torch. A checkpoint without it (written before spikes were detected) starts an empty window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from trinity.spec.stability import SpikeSpec


@dataclass(frozen=True)
class Spike:
    """One flagged step: its loss, the window's statistics and the score that crossed the threshold."""

    step: int
    loss: float
    threshold: float
    mean: float
    std: float
    score: float
    """(loss - mean) / std for kind zscore, loss / mean for kind ratio."""
    kind: str

    def data(self) -> dict[str, Any]:
        """The event row's data: what was measured against what."""
        out: dict[str, Any] = {"loss": self.loss, "threshold": self.threshold, "mean": self.mean}
        if self.kind == "zscore":
            out.update(std=self.std, zscore=self.score)
        else:
            out.update(ratio=self.score)
        return out


class SpikeDetector:
    """The running window of non-spike losses and the skip actions taken, both resumable."""

    def __init__(self, spec: SpikeSpec) -> None:
        self.spec = spec
        self.window: deque[float] = deque(maxlen=spec.window)
        self.flagged: list[tuple[int, str]] = []
        """(step, action) of each spike acted on by warn or skip (rollbacks are kept in the node's rollbacks.json:
        a rollback returns to a checkpoint that predates it)."""

    @property
    def skipped(self) -> list[int]:
        """Steps whose optimizer update was skipped."""
        return [step for step, action in self.flagged if action == "skip"]

    def record(self, step: int, action: str) -> None:
        """Note the action taken on the spike at `step` (warn or skip)."""
        self.flagged.append((step, action))

    def statistics(self) -> tuple[float, float]:
        """The window's mean and population standard deviation."""
        n = len(self.window)
        mean = math.fsum(self.window) / n
        return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in self.window) / n)

    def check(self, step: int, loss: float) -> Spike | None:
        """Whether `loss` (of optimizer step `step`) is a spike; a loss that is not enters the window."""
        spike = self._judge(step, loss)
        if spike is None:
            self.window.append(float(loss))
        return spike

    def _judge(self, step: int, loss: float) -> Spike | None:
        if len(self.window) < self.spec.window:
            return None
        mean, std = self.statistics()
        if self.spec.kind == "zscore":
            if std <= 0.0:
                return None
            score = (loss - mean) / std
        else:
            if mean <= 0.0:
                return None  # a ratio to a non-positive mean means nothing
            score = loss / mean
        if score <= self.spec.threshold:
            return None
        return Spike(step, float(loss), self.spec.threshold, mean, std, score, self.spec.kind)

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "flagged": [[step, action] for step, action in self.flagged]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a checkpoint's state (None or {}: an empty window, no actions yet). A window longer than
        this spec's keeps its newest values."""
        state = state or {}
        self.window = deque((float(v) for v in state.get("window", [])), maxlen=self.spec.window)
        self.flagged = [(int(step), str(action)) for step, action in state.get("flagged", [])]
