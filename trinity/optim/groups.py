"""Parameter groups and the combined Muon + AdamW optimizer (PAPER.md 4).

Muon: every hidden matrix (attention q/k/v/gate/o, dense and shared SwiGLU, each stacked expert
tensor [E, out, in]) and the router when OptimSpec.router_optimizer == 'muon' (in a group of its own,
`muon_no_decay`).
AdamW: the embedding and the LM head (with weight decay), the router when router_optimizer == 'adamw',
and every 1-D parameter (norm gains), these two without decay.

The router never gets weight decay, whichever optimizer holds it: decay pulls its rows toward zero,
so every expert's score toward sigmoid(0) = 0.5, i.e. toward uniform routing, a pull against
specialisation that the bias update then has to fight (the expert bias, a buffer, is never decayed
either).
Buffers (expert bias, SMEBU momentum, RoPE tables) are not parameters and never reach an optimizer.

Learning-rate schedule contract: every group carries `base_lr` (its peak lr) and a `name`;
`TrinityOptimizer.set_lr_factor(f)` sets `lr = base_lr * f` in all groups of both optimizers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trinity.optim.muon import Muon
from trinity.optim.ns_schedule import ns_schedule
from trinity.spec.optim import OptimSpec

EMBEDDING_SUFFIX = "tok_embeddings.weight"
HEAD_SUFFIX = "output.weight"
ROUTER_SUFFIX = "router.weight"


def classify(name: str, p: torch.Tensor, router_optimizer: str) -> str:
    """'muon', 'muon_no_decay', 'adamw_decay' or 'adamw_no_decay' for a named parameter."""
    if name.endswith((EMBEDDING_SUFFIX, HEAD_SUFFIX)):
        return "adamw_decay"
    if name.endswith(ROUTER_SUFFIX):
        return "muon_no_decay" if router_optimizer == "muon" else "adamw_no_decay"
    return "muon" if p.ndim >= 2 else "adamw_no_decay"


def param_group_names(model: nn.Module, spec: OptimSpec) -> dict[str, list[str]]:
    """Parameter names per group (shared/tied parameters appear once)."""
    out: dict[str, list[str]] = {"muon": [], "muon_no_decay": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[classify(name, p, spec.router_optimizer)].append(name)
    return out


class TrinityOptimizer:
    """Muon and AdamW stepped together, with one state dict and one lr factor."""

    def __init__(self, muon: Muon | None, adamw: torch.optim.AdamW | None) -> None:
        self.muon, self.adamw = muon, adamw
        self.optimizers: list[torch.optim.Optimizer] = [o for o in (muon, adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        """lr = base_lr * factor in every group (the schedule's multiplier of the peak)."""
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "muon": self.muon.state_dict() if self.muon else None,
            "adamw": self.adamw.state_dict() if self.adamw else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model: nn.Module, spec: OptimSpec) -> TrinityOptimizer:
    """Muon + AdamW over `model`'s parameters, grouped as in the module docstring."""
    params = dict(model.named_parameters())
    names = param_group_names(model, spec)
    m, a = spec.muon, spec.adamw
    muon = None
    muon_groups = [
        {"params": [params[n] for n in names[g]], "name": g, "weight_decay": wd}
        for g, wd in (("muon", m.weight_decay), ("muon_no_decay", 0.0))
        if names[g]
    ]
    if muon_groups:
        schedule = ns_schedule(m.ns_schedule, m.ns_steps, m.ns_coefficients)
        muon = Muon(
            muon_groups,
            lr=m.lr,
            weight_decay=m.weight_decay,
            momentum=m.momentum,
            nesterov=m.nesterov,
            ns_coefficients=m.ns_coefficients,
            ns_steps=m.ns_steps,
            eps=m.eps,
            lr_scaling=m.lr_scaling,
            ns_dtype=m.ns_dtype,
            ns_schedule=schedule.coefficients,
            ns_norm_scale=schedule.norm_scale,
        )
    adam_groups = [
        {"params": [params[n] for n in names[g]], "name": g, "weight_decay": wd, "base_lr": a.lr}
        for g, wd in (("adamw_decay", a.weight_decay), ("adamw_no_decay", 0.0))
        if names[g]
    ]
    adamw = torch.optim.AdamW(adam_groups, lr=a.lr, betas=a.betas, eps=a.eps) if adam_groups else None
    return TrinityOptimizer(muon, adamw)
