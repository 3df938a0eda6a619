"""MoE alarms: `events` rows when a layer's routing goes wrong for a while (stability.alarms).

Three conditions, checked once per optimizer step from what the step already computed (the expert
counts summed over the global batch, MaxVio per layer, the expert bias after its update):

    max_vio_alarm  a layer's MaxVio > max_vio for `consecutive` steps in a row
                   data {layer, steps (how long it has held), value (this step's MaxVio), threshold}
    dead_expert    an expert of a layer received no token for `consecutive` steps in a row
                   data {layer, expert, steps}
    bias_drift     a layer's expert-bias range (max - min) > bias_drift
                   data {layer, range, threshold}

An alarm fires once, on the step its condition has held long enough, and fires again only after the
condition cleared (one step without it) and held again: an episode is one event, not one per step.
Alarms change nothing in training. Their counters are kept in the training checkpoint (key "alarms"),
so a resume neither fires again for an episode already reported before that checkpoint nor misses
one; the re-run steps after the checkpoint are judged again, like the telemetry rows they replace.
Every rank runs the same observation (the inputs agree across ranks); rank 0 writes the events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trinity.spec.stability import AlarmSpec


@dataclass(frozen=True)
class Alarm:
    """One event to write: its kind, a readable message, its data."""

    kind: str
    message: str
    data: dict[str, Any]


@dataclass
class _Run:
    """How many steps in a row a condition has held, and whether its alarm fired in this episode."""

    steps: int = 0
    fired: bool = False

    def advance(self, holds: bool, needed: int) -> bool:
        """Count this step; True exactly when the alarm should fire now."""
        if not holds:
            self.steps, self.fired = 0, False
            return False
        self.steps += 1
        if self.steps >= needed and not self.fired:
            self.fired = True
            return True
        return False


@dataclass
class MoEAlarms:
    """The alarm counters of one training node, fed one step at a time."""

    spec: AlarmSpec
    raised: int = 0
    """Alarms fired by this attempt (shown in status progress)."""
    _vio: dict[int, _Run] = field(default_factory=dict)
    _dead: dict[tuple[int, int], _Run] = field(default_factory=dict)
    _drift: dict[int, _Run] = field(default_factory=dict)

    def observe(
        self, step: int, counts_LE: torch.Tensor, max_vio_L: torch.Tensor | None, bias_LE: torch.Tensor | None
    ) -> list[Alarm]:
        """The alarms step `step` fires, given its expert counts [L, E], MaxVio [L] and expert bias [L, E]."""
        spec, out = self.spec, []
        counts = counts_LE.detach().cpu().tolist()
        for layer, counts_E in enumerate(counts):
            if spec.max_vio is not None and max_vio_L is not None:
                value = float(max_vio_L[layer])
                run = self._vio.setdefault(layer, _Run())
                if run.advance(value > spec.max_vio, spec.consecutive):
                    out.append(
                        Alarm(
                            "max_vio_alarm",
                            f"MoE layer {layer}: MaxVio {value:.3g} above {spec.max_vio} for {run.steps} steps",
                            {"layer": layer, "steps": run.steps, "value": value, "threshold": spec.max_vio},
                        )
                    )
            if spec.dead_experts:
                for expert, n in enumerate(counts_E):
                    run = self._dead.setdefault((layer, expert), _Run())
                    if run.advance(n == 0, spec.consecutive):
                        out.append(
                            Alarm(
                                "dead_expert",
                                f"MoE layer {layer}: expert {expert} received no token for {run.steps} steps",
                                {"layer": layer, "expert": expert, "steps": run.steps},
                            )
                        )
            if spec.bias_drift is not None and bias_LE is not None:
                bias_E = bias_LE[layer].detach().float()
                spread = float(bias_E.max() - bias_E.min())
                run = self._drift.setdefault(layer, _Run())
                if run.advance(spread > spec.bias_drift, 1):
                    out.append(
                        Alarm(
                            "bias_drift",
                            f"MoE layer {layer}: expert-bias range {spread:.3g} above {spec.bias_drift}",
                            {"layer": layer, "range": spread, "threshold": spec.bias_drift},
                        )
                    )
        self.raised += len(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The counters (plain ints and bools, in a fixed order: every rank's checkpoint skeleton agrees)."""

        def runs(table: dict[Any, _Run]) -> list[list[Any]]:
            return [[*(k if isinstance(k, tuple) else (k,)), r.steps, r.fired] for k, r in sorted(table.items())]

        return {"max_vio": runs(self._vio), "dead": runs(self._dead), "drift": runs(self._drift)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the counters (None or {}: none yet, as for a checkpoint written before alarms existed)."""
        state = state or {}
        self._vio = {int(e[0]): _Run(int(e[1]), bool(e[2])) for e in state.get("max_vio", [])}
        self._dead = {(int(e[0]), int(e[1])): _Run(int(e[2]), bool(e[3])) for e in state.get("dead", [])}
        self._drift = {int(e[0]): _Run(int(e[1]), bool(e[2])) for e in state.get("drift", [])}
