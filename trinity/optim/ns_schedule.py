"""Newton-Schulz coefficient schedules: which quintic each iteration of Muon's orthogonalisation applies.

Muon replaces an update G by an approximation of its polar factor U V^T (G = U S V^T). It divides G by
its Frobenius norm, so every singular value lies in (0, 1], then iterates

    X <- a_t X + b_t (X X^T) X + c_t (X X^T)^2 X        t = 0 .. ns_steps - 1

which maps every singular value s of X to p_t(s) = a_t s + b_t s^3 + c_t s^5 and leaves the singular
vectors alone. A schedule is the list of (a_t, b_t, c_t) and the normalisation (MuonSpec.ns_schedule):

fixed          (a, b, c) = MuonSpec.ns_coefficients at every iteration, X_0 = G / max(||G||_F, eps):
               torch.optim.Muon's iteration, by default Keller Jordan's (3.4445, -4.7750, 2.0315). It
               does not converge to 1; it reaches a plateau fast. After 5 iterations a singular value
               s_0 in [1e-3, 1] (relative to ||G||_F) ends in [0.47, 1.20] ([0.68, 1.13] for s_0 >= 1e-2).
polar_express  Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, Algorithm 1): p_t is
               the odd quintic that is optimal in the worst case for singular values that start in
               [1e-3, 1] (Theorem 4.1), so the early iterations are aggressive and the later ones
               converge (the composition tends to 1). Made safe for bf16 as the paper's Section 4.4
               and Algorithm 1 do: every polynomial but the last of the published list is evaluated
               at s / 1.01 (a / 1.01, b / 1.01^3, c / 1.01^5), so round-off that pushes a singular
               value past the interval's top cannot grow over the iterations, and X_0 is G divided by
               1.01 ||G||_F. Iterations past the published list repeat its last polynomial (which is
               the degree-5 Newton-Schulz polynomial (15 s - 10 s^3 + 3 s^5) / 8). After 5 iterations
               s_0 in [1e-3, 1] ends in [0.84, 1.12]; after 6 in [0.993, 1.002].

(The band figures are the minimum and maximum of the composed scalar polynomials over the interval,
in float64; tests/optim/test_ns_schedule.py recomputes them.)

One difference from Algorithm 1, on purpose: it divides by 1.01 ||G||_F + 1e-7, we by
max(1.01 ||G||_F, eps), the same guard as `fixed` (a zero update stays zero); the two differ only for
a norm within a few eps of zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Triple = tuple[float, float, float]
"""The coefficients (a, b, c) of one quintic iteration p(s) = a s + b s^3 + c s^5."""

ScheduleName = Literal["fixed", "polar_express"]

POLAR_EXPRESS_PUBLISHED: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
"""Polar Express degree-5 polynomials for the lower bound 1e-3, as published (arXiv 2505.16932,
Algorithm 1; data from the paper, before the safety factor)."""

POLAR_EXPRESS_SAFETY = 1.01
"""Safety factor of Algorithm 1: each polynomial but the last is p(s / 1.01); X_0 = G / (1.01 ||G||_F)."""


def polar_express_safe() -> tuple[Triple, ...]:
    """The published polynomials with the safety factor applied to all but the last (Algorithm 1)."""
    f = POLAR_EXPRESS_SAFETY
    *head, last = POLAR_EXPRESS_PUBLISHED
    return (*((a / f, b / f**3, c / f**5) for a, b, c in head), last)


@dataclass(frozen=True)
class NSSchedule:
    """What Newton-Schulz applies: one (a, b, c) per iteration, and the norm factor of X_0."""

    coefficients: tuple[Triple, ...]
    """(a_t, b_t, c_t) of iteration t; their count is the number of iterations."""
    norm_scale: float
    """X_0 = G / max(norm_scale ||G||_F, eps) (1.0 for `fixed`, as torch.optim.Muon)."""


def ns_schedule(name: ScheduleName, steps: int, coefficients: Triple) -> NSSchedule:
    """The schedule `name` over `steps` iterations (`coefficients` is `fixed`'s triple; others ignore it)."""
    if steps < 1:
        raise ValueError(f"Newton-Schulz needs at least one iteration; got ns_steps = {steps}")
    if name == "fixed":
        a, b, c = coefficients
        return NSSchedule(coefficients=((float(a), float(b), float(c)),) * steps, norm_scale=1.0)
    if name == "polar_express":
        safe = polar_express_safe()
        extra = max(0, steps - len(safe))
        return NSSchedule(coefficients=safe[:steps] + (safe[-1],) * extra, norm_scale=POLAR_EXPRESS_SAFETY)
    raise ValueError(f"ns_schedule = {name!r} must be 'fixed' or 'polar_express'")
