"""Balancing and stability functions against hand-computed values (PAPER.md 3)."""

from __future__ import annotations

import math

import pytest
import torch

from trinity.model import TrinityModel
from trinity.optim.balancing import (
    combine_aux_loss,
    max_vio,
    sequence_aux_loss,
    sign_update,
    smebu_update,
    update_expert_biases,
    z_loss,
)
from trinity.spec.model import ModelSpec
from trinity.spec.stability import NoBalancing, SignBalancing, SmebuBalancing


def test_sign_update_hand_values() -> None:
    bias = torch.zeros(4)
    sign_update(bias, torch.tensor([10, 30, 20, 20]), gamma=0.1)  # n_mean 20: signs +1, -1, 0, 0
    torch.testing.assert_close(bias, torch.tensor([0.1, -0.1, 0.0, 0.0]))
    sign_update(bias, torch.tensor([0, 0, 0, 40]), gamma=0.1)  # signs +1, +1, +1, -1 -> mean 0.05
    torch.testing.assert_close(bias, torch.tensor([0.15, -0.05, 0.05, -0.15]))


def test_smebu_hand_values() -> None:
    spec = SmebuBalancing(**{"lambda": 0.5, "beta": 0.5, "kappa": 2.0})
    bias, mom = torch.zeros(2), torch.zeros(2)
    smebu_update(bias, mom, torch.tensor([1, 3]), spec)
    # n_mean 2, v = (0.5, -0.5), d = 0.5 tanh(+-1) (mean 0), m = 0.5 d, b = m.
    d = 0.5 * math.tanh(1.0)
    torch.testing.assert_close(mom, torch.tensor([0.5 * d, -0.5 * d]))
    torch.testing.assert_close(bias, torch.tensor([0.5 * d, -0.5 * d]))
    smebu_update(bias, mom, torch.tensor([2, 2]), spec)  # balanced: d = 0, momentum halves and still moves b
    torch.testing.assert_close(mom, torch.tensor([0.25 * d, -0.25 * d]))
    torch.testing.assert_close(bias, torch.tensor([0.75 * d, -0.75 * d]))


def test_smebu_centres_the_step() -> None:
    spec = SmebuBalancing(**{"lambda": 1.0, "beta": 0.0, "kappa": 1.0})
    bias, mom = torch.zeros(3), torch.zeros(3)
    smebu_update(bias, mom, torch.tensor([0, 0, 6]), spec)  # v = (1, 1, -2)
    raw = torch.tanh(torch.tensor([1.0, 1.0, -2.0]))
    torch.testing.assert_close(bias, raw - raw.mean())


def test_nothing_routed_changes_nothing() -> None:
    bias, mom = torch.tensor([0.3, -0.3]), torch.tensor([0.1, -0.1])
    smebu_update(bias, mom, torch.zeros(2, dtype=torch.long), SmebuBalancing())
    sign_update(bias, torch.zeros(2, dtype=torch.long), 0.1)
    assert bias.tolist() == pytest.approx([0.3, -0.3]) and mom.tolist() == pytest.approx([0.1, -0.1])
    assert max_vio(torch.zeros(3, dtype=torch.long)).item() == 0.0


def test_max_vio_hand_values() -> None:
    assert max_vio(torch.tensor([10, 30, 20, 20])).item() == pytest.approx(0.5)
    torch.testing.assert_close(max_vio(torch.tensor([[5, 5], [0, 0], [0, 4]])), torch.tensor([0.0, 0.0, 1.0]))


def test_sequence_aux_loss_hand_values() -> None:
    # One sequence, T=2, E=2, K=1. Token 0 -> expert 0, token 1 -> expert 0.
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.3]]])
    ids = torch.tensor([[[0], [0]]])
    # f = E/(K T) * counts = (2, 0); P_0 = mean(0.75, 0.5) = 0.625 -> loss 1.25.
    assert sequence_aux_loss(scores, ids).item() == pytest.approx(1.25)
    # Two sequences are averaged: a uniform one gives exactly 1.
    scores2 = torch.cat([scores, torch.full((1, 2, 2), 0.5)])
    ids2 = torch.cat([ids, torch.tensor([[[0], [1]]])])
    assert sequence_aux_loss(scores2, ids2).item() == pytest.approx((1.25 + 1.0) / 2)
    assert combine_aux_loss(torch.tensor([1.0, 3.0]), "sum").item() == 4.0
    assert combine_aux_loss(torch.tensor([1.0, 3.0]), "mean").item() == 2.0


def test_z_loss_hand_value() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # lse = ln 2, ln 4
    assert z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_update_expert_biases_on_a_model_and_state_dict() -> None:
    spec = ModelSpec.model_validate(
        dict(
            vocab_size=32,
            d_model=16,
            n_layers=3,
            n_dense_layers=1,
            n_heads=2,
            n_kv_heads=1,
            head_dim=8,
            dense_hidden=16,
            sliding_window=4,
            moe=dict(n_experts=4, top_k=1, expert_hidden=8),
        )
    )
    model = TrinityModel(spec)
    counts = torch.tensor([[1, 1, 1, 5], [2, 2, 2, 2]])
    vio = update_expert_biases(model, counts, SmebuBalancing())
    torch.testing.assert_close(vio, torch.tensor([1.5, 0.0]))
    first, second = model.moe_layers()
    assert first.expert_bias[3] < 0 < first.expert_bias[0] and torch.all(second.expert_bias == 0)
    sd = model.state_dict()
    assert torch.equal(sd["layers.1.mlp.expert_bias"], first.expert_bias)
    assert torch.equal(sd["layers.1.mlp.expert_bias_momentum"], first.expert_bias_momentum)
    before = first.expert_bias.clone()
    update_expert_biases(model, counts, NoBalancing())
    assert torch.equal(first.expert_bias, before)
    update_expert_biases(model, counts, SignBalancing(gamma=0.01))
    assert first.expert_bias[3] < before[3]
    with pytest.raises(ValueError, match="MoE layers"):
        update_expert_biases(model, counts[:1], NoBalancing())
