"""Newton-Schulz schedules (MuonSpec.ns_schedule) against independent references.

References: the Polar Express iteration written again here in float64 numpy, with the coefficients
typed from the paper (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, Algorithm 1: the
published list, each polynomial but the last divided as (a / 1.01, b / 1.01^3, c / 1.01^5), X_0 =
G / (1.01 ||G||_F + 1e-7)); the scalar polynomials themselves (an odd matrix polynomial maps each
singular value by the scalar one, so the output's singular values are known in closed form); and
torch.optim.Muon's `_zeropower_via_newtonschulz` for `fixed`.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch.optim._muon import _zeropower_via_newtonschulz
from typer.testing import CliRunner

import trinity.optim.muon as muon_module
from tests.conftest import ROOT
from tests.optim.test_muon import small_model
from trinity.cli import app
from trinity.graph.identity import canonical_json, identity_payload
from trinity.optim import Muon, build_optimizer, lr_multiplier
from trinity.optim.muon import newton_schulz, orthogonalised
from trinity.optim.ns_schedule import ns_schedule
from trinity.spec.optim import MuonSpec, OptimSpec

Array = NDArray[np.float64]

PAPER = [  # arXiv 2505.16932, Algorithm 1 (before the safety factor)
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
SAFE = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in PAPER[:-1]] + [PAPER[-1]]
JORDAN = (3.4445, -4.7750, 2.0315)


def paper_coefficients(steps: int) -> list[tuple[float, float, float]]:
    return SAFE[:steps] + [SAFE[-1]] * max(0, steps - len(SAFE))


def reference_polar_express(g: Array, steps: int) -> Array:
    """Algorithm 1 in float64: wide orientation, X_0 = G / (1.01 ||G||_F + 1e-7), X <- aX + (bA + cA^2)X."""
    x = g.astype(np.float64)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = np.swapaxes(x, -1, -2)
    x = x / (1.01 * np.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-7)
    for a, b, c in paper_coefficients(steps):
        gram = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return np.swapaxes(x, -1, -2) if tall else x


def scalar_composition(s: Array, coefficients: list[tuple[float, float, float]]) -> Array:
    for a, b, c in coefficients:
        s = a * s + b * s**3 + c * s**5
    return s


def polar_express(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    schedule = ns_schedule("polar_express", steps, JORDAN)
    return newton_schulz(g, schedule.coefficients, 1e-7, dtype, schedule.norm_scale)


def singular_values(x: torch.Tensor) -> Array:
    return np.linalg.svd(x.double().numpy(), compute_uv=False)


def test_polar_express_schedule_is_the_papers_with_its_safety_factor() -> None:
    for steps in (1, 5, 8, 12):
        assert ns_schedule("polar_express", steps, JORDAN).coefficients == tuple(paper_coefficients(steps))
    assert ns_schedule("polar_express", 5, JORDAN).norm_scale == 1.01
    assert ns_schedule("fixed", 4, JORDAN) == ns_schedule("fixed", 4, JORDAN)
    assert ns_schedule("fixed", 4, JORDAN).coefficients == (JORDAN,) * 4
    assert ns_schedule("fixed", 4, JORDAN).norm_scale == 1.0


@pytest.mark.parametrize("steps", [5, 10])  # 10: past the 8 published polynomials, the last repeats
@pytest.mark.parametrize("shape", [(32, 64), (96, 40), (4, 24, 40)])  # wide, tall, stacked experts
def test_polar_express_matches_float64_reference(shape: tuple[int, ...], steps: int) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = polar_express(g, steps, torch.float32).double().numpy()
    np.testing.assert_allclose(ours, reference_polar_express(g.numpy(), steps), rtol=0, atol=2e-5)


def test_polar_express_singular_values_are_the_scalar_polynomials_of_the_inputs() -> None:
    g = torch.randn(40, 72, generator=torch.Generator().manual_seed(1))
    s0 = singular_values(g) / (1.01 * np.linalg.norm(g.double().numpy()))
    expected = np.sort(scalar_composition(s0, paper_coefficients(5)))
    np.testing.assert_allclose(np.sort(singular_values(polar_express(g, 5, torch.float32))), expected, atol=2e-5)


def test_polar_express_in_bf16_stays_in_the_papers_band() -> None:
    """The polynomials are built for singular values in [1e-3, 1] of the Frobenius norm; after 5
    iterations such a value lies in the band of the composed polynomials over that interval (about
    [0.840, 1.124], computed here), after 8 within 1e-15 of 1. bf16 round-off adds a little: 0.01 slack."""
    grid = np.geomspace(1e-3, 1.0, 100_001) / 1.01
    for steps, (lo, hi) in ((5, (0.84, 1.124)), (8, (1.0, 1.0))):
        band = scalar_composition(grid, paper_coefficients(steps))
        assert band.min() == pytest.approx(lo, abs=1e-3) and band.max() == pytest.approx(hi, abs=1e-3)
        for shape in [(64, 128), (128, 64), (3, 32, 48)]:
            g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
            relative = singular_values(g) / np.linalg.norm(g.double().numpy(), axis=(-2, -1))[..., None]
            assert relative.min() >= 1e-3  # the polynomials' precondition holds for these inputs
            sv = singular_values(polar_express(g, steps, torch.bfloat16))
            assert band.min() - 0.01 <= sv.min() and sv.max() <= band.max() + 0.01, (steps, shape, sv.min(), sv.max())


def test_polar_express_orthogonalises_better_than_fixed_at_5_steps() -> None:
    """Why it must: the fixed quintic plateaus (its composition over [1e-2, 1] stays in [0.68, 1.13]),
    Polar Express's 5-step composition over [1e-2, 1] lies in [0.87, 1.124]. Gaussian matrices of these
    shapes have every singular value above 1e-2 of the Frobenius norm."""
    for k, shape in enumerate([(64, 128), (128, 64), (96, 96 + 32), (4, 32, 48)]):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(10 + k))
        pe = np.abs(singular_values(polar_express(g, 5, torch.float32)) - 1).max()
        fixed = newton_schulz(g, ns_schedule("fixed", 5, JORDAN).coefficients, 1e-7, torch.float32)
        fx = np.abs(singular_values(fixed) - 1).max()
        assert pe < 0.14 and fx > 0.3 and pe < fx / 2, (shape, pe, fx)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_fixed_schedule_is_torch_muons_iteration(shape: tuple[int, int]) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    coefficients = (3.0, -3.2, 1.2)  # not the default: the triple must reach every iteration
    schedule = ns_schedule("fixed", 3, coefficients)
    ours = newton_schulz(g, schedule.coefficients, 1e-7, torch.bfloat16, schedule.norm_scale)
    torch.testing.assert_close(ours, _zeropower_via_newtonschulz(g, coefficients, 3, 1e-7), atol=0, rtol=0)


@pytest.mark.parametrize("schedule", ["fixed", "polar_express"])
def test_one_step_from_the_spec_equals_a_step_by_hand(schedule: str) -> None:
    """W' = W (1 - lr wd) - lr sqrt(max(1, out/in)) NS(U), U = (1 - mu) G + mu (1 - mu) G on the first
    step; NS by the float64 reference (polar_express, fp32 Newton-Schulz) or by torch.optim.Muon's
    own iteration (fixed, the spec left as it was: its numbers must not change)."""
    torch.manual_seed(0)
    model = small_model()
    muon: dict[str, Any] = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9}
    if schedule == "polar_express":
        muon |= {"ns_schedule": "polar_express", "ns_dtype": "fp32"}
    spec = OptimSpec.model_validate({"muon": muon})
    opt = build_optimizer(model, spec)
    ids = torch.randint(0, 64, (2, 12))
    model(ids, labels_BT=ids).ce_loss.backward()
    params = dict(model.named_parameters())
    names = ["layers.0.attn.wq.weight", "layers.0.mlp.w1.weight"]
    if schedule == "polar_express":  # (fixed on expert stacks: test_muon.py's per-expert test)
        names.append("layers.1.mlp.experts.w1_EFD")
    before = {n: (params[n].detach().clone(), params[n].grad.clone()) for n in names}  # type: ignore[union-attr]
    opt.step()
    m = spec.muon
    for n, (w, g) in before.items():
        update = (1 - m.momentum) * g + m.momentum * (1 - m.momentum) * g
        if schedule == "polar_express":
            ortho = torch.from_numpy(reference_polar_express(update.double().numpy(), m.ns_steps))
            atol = 1e-6
        else:
            ortho = _zeropower_via_newtonschulz(update, JORDAN, 5, m.eps)
            atol = 1e-6  # the same bf16 Newton-Schulz; the step's elementwise arithmetic rounds differently
        factor = lr_multiplier(w.shape, m.lr_scaling)
        expected = w.double() * (1 - m.lr * m.weight_decay) - m.lr * factor * ortho.double()
        torch.testing.assert_close(params[n].detach().double(), expected, atol=atol, rtol=0, msg=n)


def test_unset_ns_schedule_keeps_identity_and_the_choice_changes_it() -> None:
    # The identity payload of MuonSpec() from trinity before ns_schedule existed (commit 5ef380e).
    before = "cef27ecb0e6a6d58ecfed6d7333c146434b357e36441bdc0971a42068ccbfcda"

    def digest(spec: MuonSpec) -> str:
        return hashlib.sha256(canonical_json(identity_payload(spec)).encode()).hexdigest()

    assert digest(MuonSpec()) == before
    assert digest(MuonSpec(ns_schedule="fixed")) == before
    assert digest(MuonSpec(ns_schedule="polar_express")) != before
    with pytest.raises(ValueError, match="ns_coefficients"):  # coefficients that polar_express would ignore
        MuonSpec(ns_schedule="polar_express", ns_coefficients=(3.0, -3.2, 1.2))


def test_checkpoint_groups_without_a_schedule_still_load_and_step_as_before() -> None:
    """A state dict from before ns_schedule (its groups lack ns_schedule / ns_norm_scale) loads, and the
    next step equals the uninterrupted run's: torch's load_state_dict takes the checkpoint's groups, so
    even an optimizer built with another schedule resumes with what the checkpoint's run computed."""
    shapes = [(24, 16), (2, 16, 24)]
    torch.manual_seed(0)
    init = [torch.randn(s) * 0.1 for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]

    def step(opt: Muon, params: list[torch.nn.Parameter], step_grads: list[torch.Tensor]) -> None:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()

    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref = Muon(ref_params, lr=0.02)
    step(ref, ref_params, grads[0])
    old_state = copy.deepcopy(ref.state_dict())
    for group in old_state["param_groups"]:
        del group["ns_schedule"], group["ns_norm_scale"]
    after_first = [p.detach().clone() for p in ref_params]
    step(ref, ref_params, grads[1])

    params = [torch.nn.Parameter(t) for t in after_first]
    resumed = Muon(params, lr=0.02, ns_schedule=ns_schedule("polar_express", 5, JORDAN).coefficients)
    resumed.load_state_dict(old_state)
    assert resumed.param_groups[0]["ns_schedule"] == (JORDAN,) * 5
    assert resumed.param_groups[0]["ns_norm_scale"] == 1.0
    step(resumed, params, grads[1])
    for p, p_ref in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.detach(), p_ref.detach(), atol=0, rtol=0)


def test_sharded_path_gets_the_groups_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """orthogonalise_sharded runs whatever Newton-Schulz callable it is given on the owner rank
    (tests/distributed/test_muon_sharded.py); the callable Muon gives it must apply the group's schedule."""
    schedule = ns_schedule("polar_express", 6, JORDAN)
    seen: list[torch.Tensor] = []

    def fake_sharded(update: torch.Tensor, like: object, ns: Any, index: int) -> torch.Tensor:
        seen.append(ns(update))
        return seen[-1]

    monkeypatch.setattr(muon_module, "orthogonalise_sharded", fake_sharded)
    group = {"ns_schedule": schedule.coefficients, "ns_norm_scale": schedule.norm_scale, "eps": 1e-7}
    group["ns_dtype"] = "fp32"
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(4))
    orthogonalised(g, group, 0, like=object())  # type: ignore[arg-type]
    np.testing.assert_allclose(seen[0].double().numpy(), reference_polar_express(g.numpy(), 6), atol=2e-5)


def test_trinity_diff_shows_the_choice_changes_identities_and_rejects_ignored_coefficients() -> None:
    """The command a user types to see what the choice re-runs; coefficients it would ignore are an error."""
    tiny = str(ROOT / "graphs" / "tiny.yaml")
    result = CliRunner().invoke(app, ["diff", tiny, tiny, "--set", "optim.muon.ns_schedule=polar_express"])
    assert result.exit_code == 0, result.output
    assert "optim.muon.ns_schedule" in result.output and "re-run (12)" in result.output, result.output
    same = CliRunner().invoke(app, ["diff", tiny, tiny, "--set", "optim.muon.ns_schedule=fixed"])
    assert same.exit_code == 0 and "re-run (0)" in same.output, same.output
    bad = ["--set", "optim.muon.ns_schedule=polar_express", "--set", "optim.muon.ns_coefficients=[3,-3.2,1.2]"]
    rejected = CliRunner().invoke(app, ["diff", tiny, tiny, *bad])
    assert rejected.exit_code != 0 and "used only by ns_schedule 'fixed'" in rejected.output, rejected.output
