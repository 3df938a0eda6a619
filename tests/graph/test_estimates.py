"""Estimates: PAPER.md's parameter counts, and closed forms checked against brute force."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from trinity.graph.estimates import count_params, flops_per_token, mean_context
from trinity.spec.loading import load_experiment

# PAPER.md section 1, counted from the layer structure: total / active / active without embedding and head.
PUBLISHED = {
    "nano": (6.12e9, 1.02e9, 0.61e9),
    "mini": (26.12e9, 3.47e9, 2.65e9),
    "large": (398.64e9, 13.37e9, 12.14e9),
}


def within(value: float, published: float) -> bool:
    """Within 0.5%, or within the rounding of the published figure (0.61B stands for [0.605, 0.615))."""
    digits = len(repr(published / 1e9).split(".")[1])
    half_unit = 0.5 * 10.0 ** (-digits) * 1e9
    return abs(value - published) <= max(0.005 * published, half_unit)


@pytest.mark.parametrize("name", ["nano", "mini", "large"])
def test_plan_json_reproduces_published_parameter_counts(name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trinity.cli", "plan", f"graphs/trinity-{name}.yaml", "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    plan = json.loads(out.stdout)
    est = plan["estimates"]
    total, active, non_embedding = PUBLISHED[name]
    assert abs(est["total_params"] - total) <= 0.005 * total
    assert abs(est["active_params"] - active) <= 0.005 * active
    assert within(est["active_params_non_embedding"], non_embedding)
    for key in ("flops_per_token", "memory_per_gpu_bytes", "checkpoint_bytes", "gpu_hours"):
        assert est[key] > 0
    assert est["memory_fits"]
    assert {"id", "kind", "identity", "deps"} <= set(plan["nodes"][0])


def test_large_active_counts_within_half_a_percent_exactly() -> None:
    c = count_params(load_experiment(ROOT / "graphs" / "trinity-large.yaml").spec.model)
    assert abs(c.total / 398.64e9 - 1) < 0.0005
    assert abs(c.active_non_embedding / 12.14e9 - 1) < 0.0005


@pytest.mark.parametrize(("t", "w"), [(1, 4), (7, 4), (64, 16), (100, 1), (33, None)])
def test_mean_context_matches_brute_force(t: int, w: int | None) -> None:
    brute = sum(min(pos + 1, w or t) for pos in range(t)) / t
    assert mean_context(t, w) == pytest.approx(brute)


def test_flops_per_token_matches_layer_by_layer_sum() -> None:
    m = load_experiment(ROOT / "graphs" / "tiny.yaml").spec.model
    t = 256
    c = count_params(m)
    d, a, kv = m.d_model, m.attn_width, m.kv_width
    attn_mm = 3 * d * a + 2 * d * kv  # q, gate, o, k, v
    total = 0.0
    for i, kind in enumerate(m.attention_types()):
        if m.is_moe_layer(i):
            ffn = d * m.moe.n_experts + 3 * d * m.moe.expert_hidden * (m.moe.top_k + m.moe.n_shared_experts)
        else:
            ffn = 3 * d * m.dense_hidden
        keys = sum(min(p + 1, m.sliding_window if kind == "local" else t) for p in range(t)) / t
        total += 6 * (attn_mm + ffn) + 3 * 2 * 2 * m.n_heads * m.head_dim * keys
    total += 6 * c.head
    assert flops_per_token(m, t) == pytest.approx(total)
