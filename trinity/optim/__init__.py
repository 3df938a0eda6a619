"""Optimizers and expert-bias balancing: Muon (2-D and stacked 3-D), parameter groups, SMEBU/sign updates."""

from trinity.optim.balancing import (
    combine_aux_loss,
    max_vio,
    sign_update,
    smebu_update,
    update_expert_biases,
)
from trinity.optim.groups import TrinityOptimizer, build_optimizer, param_group_names
from trinity.optim.muon import Muon, lr_multiplier, zeropower_via_newtonschulz

__all__ = [
    "Muon",
    "TrinityOptimizer",
    "build_optimizer",
    "combine_aux_loss",
    "lr_multiplier",
    "max_vio",
    "param_group_names",
    "sign_update",
    "smebu_update",
    "update_expert_biases",
    "zeropower_via_newtonschulz",
]
