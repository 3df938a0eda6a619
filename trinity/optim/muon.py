"""Muon: momentum, then Newton-Schulz orthogonalisation, for 2-D matrices and stacked 3-D experts.

Per step, for every parameter W of shape [..., out, in] (PAPER.md 4; the same update as
torch.optim.Muon on 2-D weights):
    B <- mu B + (1 - mu) G                       (momentum buffer, an EMA as in torch.optim.Muon)
    U <- (1 - mu) G + mu B  if nesterov else B
    O <- NS(U)                                   (Newton-Schulz with the group's schedule, one
                                                  quintic per iteration: trinity.optim.ns_schedule;
                                                  per trailing matrix: a [E, out, in] expert stack
                                                  is orthogonalised as E separate matrices, batched)
    W <- W (1 - lr wd)                           (decoupled weight decay, unscaled lr as in torch)
    W <- W - lr * sqrt(max(1, out / in)) * O     (lr_scaling 'sqrt_fan_ratio'; 'none' drops the factor)

Sharded parameters (FSDP2 / expert-parallel DTensors): every matrix is orthogonalised WHOLE.
The momentum and the update stay sharded (they are elementwise); for Newton-Schulz the pieces of
each matrix are gathered on one owner rank of the shard group, which sends each rank its piece of
the result (trinity.optim.muon_sharded). The result equals the single-process step up to
reduction order.

Newton-Schulz: each group carries `ns_schedule` (one (a, b, c) per iteration) and `ns_norm_scale`;
a group without them (a checkpoint from before the schedules) gets `ns_coefficients` at each of
`ns_steps` iterations and scale 1, which is what such a run computed.

Scheduling: each group keeps its peak lr in `base_lr`; a scheduler sets
`group["lr"] = group["base_lr"] * factor` (see `TrinityOptimizer.set_lr_factor`).

Legend: E experts (leading batch dims), A rows, C cols of the matrix being orthogonalised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from trinity.optim.muon_sharded import orthogonalise_sharded
from trinity.optim.ns_schedule import Triple


def newton_schulz(
    g: torch.Tensor,
    schedule: Sequence[Triple],
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
    norm_scale: float = 1.0,
) -> torch.Tensor:
    """Approximately orthogonalise each trailing [A, C] matrix of `g`: one quintic per entry of `schedule`.

    X_0 = G / max(norm_scale ||G||_F, eps) per matrix (stacked experts never influence each other),
    then X <- a X + b (X X^T) X + c (X X^T)^2 X with the t-th (a, b, c), in `dtype`. Works on a wide
    matrix (A <= C) so the Gram matrix is the small one. With every entry equal and norm_scale 1 this
    is, for a 2-D input, operation for operation torch.optim.Muon's `_zeropower_via_newtonschulz`.
    """
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    if x.ndim == 2:
        norm = x.norm() if norm_scale == 1.0 else x.norm() * norm_scale
        x = x.div(norm.clamp(min=eps))
        for a, b, c in schedule:
            gram = x @ x.T
            gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, gram_update, x, beta=a)
    else:
        lead = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:])
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
        if norm_scale != 1.0:
            norm = norm * norm_scale
        x = x / norm.clamp(min=eps)
        for a, b, c in schedule:
            gram = x @ x.mT
            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, gram_update, x, beta=a)
        x = x.reshape(*lead, *x.shape[-2:])
    return x.mT if tall else x


def zeropower_via_newtonschulz(
    g: torch.Tensor,
    coefficients: Triple,
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`newton_schulz` with the same `coefficients` at each of `steps` iterations (the `fixed` schedule)."""
    return newton_schulz(g, (coefficients,) * steps, eps, dtype)


NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def orthogonalised(
    update: torch.Tensor, group: dict[str, Any], index: int = 0, like: DTensor | None = None
) -> torch.Tensor:
    """Newton-Schulz of each trailing matrix of `update` (plain, or this rank's piece of a matrix laid out as `like`).

    For a sharded `like` this is a collective over its shard group; `index` (the matrix's position
    in the step) spreads the matrices over the group's ranks (trinity.optim.muon_sharded).
    """
    schedule, norm_scale, eps = group["ns_schedule"], group["ns_norm_scale"], group["eps"]
    dtype = NS_DTYPES[group.get("ns_dtype", "bf16")]  # checkpoints from before the option: bf16

    def orthogonalise(x: torch.Tensor) -> torch.Tensor:
        return newton_schulz(x, schedule, eps, dtype, norm_scale)

    if like is None:
        return orthogonalise(update)
    return orthogonalise_sharded(update, like, orthogonalise, index)


def fill_schedule(group: dict[str, Any]) -> None:
    """Give a group without `ns_schedule` / `ns_norm_scale` (an older checkpoint's) what it computed then:
    `ns_coefficients` at each of `ns_steps` iterations, norm scale 1."""
    if "ns_schedule" not in group:
        group["ns_schedule"] = (tuple(group["ns_coefficients"]),) * group["ns_steps"]
    group.setdefault("ns_norm_scale", 1.0)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def lr_multiplier(shape: torch.Size, lr_scaling: str) -> float:
    """sqrt(max(1, fan_out / fan_in)) of the trailing [out, in] matrix, or 1 for lr_scaling 'none'."""
    if lr_scaling == "none":
        return 1.0
    fan_out, fan_in = shape[-2], shape[-1]
    return math.sqrt(max(1.0, fan_out / fan_in))


class Muon(Optimizer):
    """Muon over parameters with ndim >= 2 (the last two dims are the matrix)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        ns_steps: int = 5,
        eps: float = 1e-7,
        lr_scaling: str = "sqrt_fan_ratio",
        ns_dtype: str = "bf16",
        ns_schedule: Sequence[Triple] | None = None,
        ns_norm_scale: float = 1.0,
    ) -> None:
        """`ns_schedule` (one (a, b, c) per iteration, ns_steps of them) overrides `ns_coefficients` at
        every iteration; X_0 of Newton-Schulz is G / max(ns_norm_scale ||G||_F, eps)."""
        if ns_schedule is not None and (len(ns_schedule) != ns_steps or any(len(t) != 3 for t in ns_schedule)):
            raise ValueError(
                f"ns_schedule must hold ns_steps = {ns_steps} triples (a, b, c); got {len(ns_schedule)} entries"
            )
        if not ns_norm_scale > 0:
            raise ValueError(f"ns_norm_scale = {ns_norm_scale} must be positive")
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype = {ns_dtype!r} must be one of {sorted(NS_DTYPES)}")
        if lr_scaling not in ("sqrt_fan_ratio", "none"):
            raise ValueError(f"lr_scaling = {lr_scaling!r} must be 'sqrt_fan_ratio' or 'none'")
        defaults = {
            "lr": lr,
            "base_lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "ns_steps": ns_steps,
            "eps": eps,
            "lr_scaling": lr_scaling,
            "ns_dtype": ns_dtype,
            "ns_norm_scale": float(ns_norm_scale),
        }
        if ns_schedule is not None:
            defaults["ns_schedule"] = tuple((float(a), float(b), float(c)) for a, b, c in ns_schedule)
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])
            fill_schedule(group)
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon needs matrices (ndim >= 2); got a parameter of shape {tuple(p.shape)}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also the end of `load_state_dict`, which takes the checkpoint's groups: fill what older ones lack."""
        super().__setstate__(state)
        for group in self.param_groups:
            fill_schedule(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1  # matrices of this step, in order: picks each sharded matrix's owner rank
        for group in self.param_groups:
            fill_schedule(group)  # a group added by add_param_group without a schedule
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                index += 1
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                # Elementwise math on this rank's pieces (a DTensor's dispatch costs more than the math).
                grad, buf, weight = (_local(t) for t in (p.grad, state["momentum_buffer"], p))
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                ortho = orthogonalised(update, group, index, p if isinstance(p, DTensor) else None)
                weight.mul_(1 - lr * wd)
                weight.add_(ortho.to(weight.dtype), alpha=-lr * lr_multiplier(p.shape, group["lr_scaling"]))
        return loss
