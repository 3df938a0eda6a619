"""Held-out loss: the windows a document is cut into, and the loss against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.model.test_transformer import small_spec
from trinity.evals.heldout import heldout_loss, windows
from trinity.model import TrinityModel


def test_heldout_windows_and_loss_against_a_direct_computation() -> None:
    doc = np.arange(1, 11)  # 10 tokens: 9 predictions
    w = windows(doc, 4)
    assert [(x.tolist(), y.tolist()) for x, y in w] == [
        ([1, 2, 3, 4], [2, 3, 4, 5]),
        ([5, 6, 7, 8], [6, 7, 8, 9]),
        ([9], [10]),
    ]
    torch.manual_seed(0)
    model = TrinityModel(small_spec()).eval()
    docs = {"a": [doc, np.array([3, 4, 5])], "b": [np.array([7, 8])]}
    got = heldout_loss(model, docs, 4, batch=2)
    total, n = 0.0, 0
    for d in docs["a"]:
        for x, y in windows(d, 4):
            logits = model(torch.from_numpy(x)[None]).logits[0].detach()
            total += float(F.cross_entropy(logits, torch.from_numpy(y), reduction="sum"))
            n += len(y)
    assert got["a"]["tokens"] == n == 11 and got["a"]["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["b"]["tokens"] == 1
