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


@pytest.mark.parametrize("held_bytes", [301 * 2 * 16, 2**30])  # one chunk held at a time / all at once
def test_low_precision_path_against_fp64(monkeypatch: pytest.MonkeyPatch, held_bytes: int) -> None:
    """Under bf16 autocast the matmuls run in bf16 and the softmax in fp32; the weight gradient
    is accumulated in fp32 (folded from the held bf16 logit gradients every chunk or once at the
    end) and returned fp32 for the fp32 weight. Reference: the same bf16-rounded operands in fp64."""
    monkeypatch.setattr(head_loss, "MAX_GRAD_ROWS_BYTES", held_bytes)
    h, w, labels = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, z = head_cross_entropy_and_z(h, w, labels, rows_per_chunk=16)
    gh, gw = grads(ce + 0.1 * z, h, w)
    assert gw.dtype == torch.float32 and gh.dtype == torch.float32
    h64, w64 = (x.detach().bfloat16().double().requires_grad_() for x in (h, w))
    want_ce, want_z = reference(h64, w64, labels)
    want_gh, want_gw = grads(want_ce + 0.1 * want_z, h64, w64)
    # The logits are rounded to bf16 by their matmul (relative 2^-9), so are the logit gradients.
    torch.testing.assert_close(ce.double(), want_ce, atol=0, rtol=1e-4)
    torch.testing.assert_close(z.double(), want_z, atol=0, rtol=1e-4)
    for got, want in ((gh, want_gh), (gw, want_gw)):
        torch.testing.assert_close(got.double(), want, atol=1e-2 * want.abs().max().item(), rtol=0)


def test_held_rows_fold_equals_single_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Folding the held bf16 rows into the fp32 weight gradient in groups gives the one-fold result."""
    h, w, labels = inputs(n=200)
    results = []
    for held_bytes in (301 * 2 * 40, 2**30):  # 40 rows held (folds after chunks of 16 + 16), or all
        monkeypatch.setattr(head_loss, "MAX_GRAD_ROWS_BYTES", held_bytes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ce, _ = head_cross_entropy_and_z(h, w, labels, rows_per_chunk=16)
        results.append(grads(ce, w)[0])
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_scratch_buffers_are_reused_and_sized() -> None:
    """CPU scratch buffers persist across calls (no page faults per step) and grow when needed."""
    from trinity.model.head_loss import _scratch

    a = _scratch("test", 4, 10, torch.float32, torch.device("cpu"))
    b = _scratch("test", 2, 10, torch.float32, torch.device("cpu"))
    assert a.shape == (4, 10) and b.shape == (2, 10) and a.data_ptr() == b.data_ptr()
    c = _scratch("test", 8, 10, torch.float32, torch.device("cpu"))
    assert c.shape == (8, 10)
    assert _scratch("test", 4, 10, torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16
    head_loss._WORKSPACE.clear()
