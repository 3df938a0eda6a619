"""MoE alarms (trinity.nodes.alarms) on crafted expert counts: exactly the events the rules give, once per
episode, and counters that survive a checkpoint."""

from __future__ import annotations

import torch

from trinity.nodes.alarms import MoEAlarms
from trinity.optim.balancing import max_vio
from trinity.spec.stability import AlarmSpec

BALANCED = [10, 10, 10, 10]
HOT = [40, 0, 0, 0]  # MaxVio = (40 - 10) / 10 = 3; experts 1..3 get nothing


def run(alarms: MoEAlarms, steps: list[tuple[list[int], list[int], list[float]]], first: int = 1) -> list[tuple]:
    """Feed (layer-0 counts, layer-1 counts, layer-1 bias) per step; the (step, kind, data) fired."""
    fired = []
    for step, (c0, c1, bias1) in enumerate(steps, first):
        counts = torch.tensor([c0, c1])
        bias = torch.tensor([[0.0] * 4, bias1])
        for a in alarms.observe(step, counts, max_vio(counts), bias):
            fired.append((step, a.kind, a.data))
    return fired


def test_each_alarm_fires_once_per_episode_after_k_steps() -> None:
    spec = AlarmSpec(max_vio=1.0, consecutive=3, bias_drift=0.5)
    flat = [0.0] * 4
    drift = [-0.3, 0.0, 0.0, 0.3]  # range 0.6 > 0.5
    steps = [
        (BALANCED, HOT, flat),  # 1: layer 1 hot, its experts 1..3 dead: 1 step
        (BALANCED, HOT, flat),  # 2
        (BALANCED, HOT, drift),  # 3: 3 steps: MaxVio alarm and 3 dead experts; the drift fires at once
        (BALANCED, HOT, drift),  # 4: still the same episodes: nothing new
        (BALANCED, [20, 20, 0, 0], flat),  # 5: MaxVio 1.0 is not above 1.0: cleared; expert 1 alive; drift cleared
        (BALANCED, HOT, flat),  # 6: a new MaxVio episode starts (1 step); experts 2, 3 still in their episode
        (BALANCED, HOT, drift),  # 7: drift again: a new episode
        (BALANCED, HOT, drift),  # 8: MaxVio 3 steps again: fires; expert 1 dead for 3 steps again: fires
    ]
    fired = run(MoEAlarms(spec), steps)
    assert fired == [
        (3, "max_vio_alarm", {"layer": 1, "steps": 3, "value": 3.0, "threshold": 1.0}),
        (3, "dead_expert", {"layer": 1, "expert": 1, "steps": 3}),
        (3, "dead_expert", {"layer": 1, "expert": 2, "steps": 3}),
        (3, "dead_expert", {"layer": 1, "expert": 3, "steps": 3}),
        (3, "bias_drift", {"layer": 1, "range": fired[4][2]["range"], "threshold": 0.5}),
        (7, "bias_drift", {"layer": 1, "range": fired[5][2]["range"], "threshold": 0.5}),
        (8, "max_vio_alarm", {"layer": 1, "steps": 3, "value": 3.0, "threshold": 1.0}),
        (8, "dead_expert", {"layer": 1, "expert": 1, "steps": 3}),
    ]
    assert abs(fired[4][2]["range"] - 0.6) < 1e-6


def test_disabled_alarms_stay_silent_and_counters_resume() -> None:
    quiet = MoEAlarms(AlarmSpec(max_vio=None, dead_experts=False, bias_drift=None, consecutive=1))
    assert run(quiet, [(HOT, HOT, [-1.0, 0.0, 0.0, 1.0])] * 3) == [] and quiet.raised == 0
    spec = AlarmSpec(max_vio=1.0, consecutive=4, dead_experts=False, bias_drift=None)
    before = MoEAlarms(spec)
    assert run(before, [(BALANCED, HOT, [0.0] * 4)] * 2) == []
    resumed = MoEAlarms(spec)
    resumed.load_state_dict(before.state_dict())  # as a checkpoint at step 2 restores it
    fired = run(resumed, [(BALANCED, HOT, [0.0] * 4)] * 3, first=3)
    assert [(s, k) for s, k, _ in fired] == [(4, "max_vio_alarm")] and resumed.raised == 1
