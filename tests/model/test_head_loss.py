"""The fused, chunked head + CE + z-loss against plain PyTorch (F.cross_entropy, logsumexp), and in the model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.model.test_transformer import small_spec
from trinity.model import TrinityModel, head_loss
from trinity.model.head_loss import GradRatio, chunk_rows, head_cross_entropy_and_z


def reference(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = h @ w.T
    ce = F.cross_entropy(logits, labels, ignore_index=-100)
    z = torch.logsumexp(logits, -1)[labels != -100].square().mean()
    return ce, z


def grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs))


def inputs(n: int = 70, d: int = 24, v: int = 301, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return h, w, labels


def test_chunk_rows() -> None:
    assert chunk_rows(4096, 4096) == 512
    assert chunk_rows(4096, 16384) == 512
    assert chunk_rows(4096, 200_000) == 80  # 64 MiB of fp32 logits at most
    assert chunk_rows(10, 16384) == 10
    assert chunk_rows(4096, 10**7) == 16  # never fewer than 16 rows


@pytest.mark.parametrize("coefs", [(1.0, 0.0), (0.5, 1e-2), (0.0, 0.3), (1.0, 1.0)])
def test_loss_and_gradients_match_plain_pytorch(coefs: tuple[float, float]) -> None:
    """Several chunks with a ragged last one (70 rows, 16 per chunk); -100 rows; any mix of CE and z."""
    a, b = coefs
    h, w, labels = inputs()
    want_ce, want_z = reference(h, w, labels)
    want = grads(a * want_ce + b * want_z, h, w)
    ratio = GradRatio()
    for _ in range(2):  # the first backward may miss the guessed ratio, the second hits it
        ce, z = head_cross_entropy_and_z(h, w, labels, ratio, rows_per_chunk=16)
        torch.testing.assert_close(ce, want_ce)
        torch.testing.assert_close(z, want_z)
        got = grads(a * ce + b * z, h, w)
        for g_got, g_want in zip(got, want, strict=True):
            torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)
        if a != 0:
            assert ratio.value == pytest.approx(b / a)


def test_guessed_ratio_skips_the_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training loop with a fixed z weight: the head pass runs once per step after the first backward."""
    calls: list[Any] = []
    real = head_loss._head_pass

    def counting(*args: Any) -> Any:
        calls.append(args[5])
        return real(*args)

    monkeypatch.setattr(head_loss, "_head_pass", counting)
    h, w, labels = inputs()
    ratio = GradRatio()
    for step in range(3):
        ce, z = head_cross_entropy_and_z(h, w, labels, ratio)
        (0.25 * ce + 0.25 * 1e-3 * z).backward()
        assert len(calls) == step + 2  # step 0: forward + recompute; later steps: forward only
    assert calls[0] == (1.0, 0.0) and calls[1] == (0.25, pytest.approx(0.25 * 1e-3))
    assert calls[2] == (1.0, pytest.approx(1e-3))  # the guess from the first backward


def test_no_valid_label_gives_zero_loss_and_gradient() -> None:
    h, w, _ = inputs()
    labels = torch.full((h.shape[0],), -100)
    ce, z = head_cross_entropy_and_z(h, w, labels)
    assert ce.item() == 0.0 and z.item() == 0.0
    gh, gw = grads(ce + z, h, w)
    assert not gh.any() and not gw.any()


def test_label_out_of_range_is_an_error() -> None:
    h, w, labels = inputs()
    labels[3] = w.shape[0]  # one past the vocabulary: must not silently read the next row
    with pytest.raises((IndexError, RuntimeError)):
        head_cross_entropy_and_z(h, w, labels)


def test_without_grad_only_the_loss() -> None:
    h, w, labels = inputs()
    with torch.no_grad():
        ce, z = head_cross_entropy_and_z(h, w, labels)
    want_ce, want_z = reference(h, w, labels)
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(z, want_z)
    assert not ce.requires_grad


def test_model_fused_path_equals_logits_path() -> None:
    """Training's default (fused, no logits) and return_logits=True give the same losses and
    the same gradient for every parameter; the lazily computed logits equal the eager ones."""
    torch.manual_seed(0)
    model = TrinityModel(small_spec())
    ids = torch.randint(0, 97, (2, 20))
    labels = torch.randint(0, 97, (2, 20))
    labels[1, 3:9] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels_BT=labels, return_logits=return_logits)
        assert (out.logits_BTV is not None) == return_logits
        (out.ce_loss + 1e-2 * out.z_loss_term + out.aux_loss_per_layer.sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager, g_eager), (fused, g_fused) = results
    torch.testing.assert_close(fused.ce_loss, eager.ce_loss)
    torch.testing.assert_close(fused.z_loss_term, eager.z_loss_term)
    torch.testing.assert_close(fused.logits, eager.logits)
    assert g_eager.keys() == g_fused.keys() and "output.weight" in g_fused
    for name in g_eager:
        torch.testing.assert_close(g_fused[name], g_eager[name], atol=1e-6, rtol=1e-5, msg=name)


def test_model_fused_path_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = TrinityModel(small_spec())
    ids = torch.randint(0, 97, (2, 20))
    losses = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels_BT=ids, return_logits=return_logits)
        out.ce_loss.backward()
        losses.append((out.ce_loss.detach(), model.output.weight.grad.clone(), model.norm.weight.grad.clone()))
    for a, b in zip(*losses, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
