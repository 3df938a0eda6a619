"""Shard a built TrinityModel over the job's mesh: expert parallelism, then FSDP2 per block.

Order (each step needs the previous one's parameters):
1. expert parallelism (ep > 1): every MoE layer keeps experts [r E/ep, (r+1) E/ep) as DTensors
   Shard(0) over "ep" and dispatches tokens with all-to-all (trinity.distributed.expert_parallel);
2. per MoE layer, `fully_shard(mlp.experts)` over ("replicate", "shard_mod_ep") with Shard(1)
   (dim 0 is already split by expert). FSDP averages its gradient over those world / ep ranks, but
   the all-to-all backward has already summed the contributions of the ep ranks, so after the
   backward passes `rescale_expert_gradients` divides by ep: the mean over the whole world. (FSDP's
   own set_gradient_divide_factor needs PREMUL_SUM, which gloo lacks, and its sum-only fallback
   divides twice under HSDP in torch 2.13.)
3. activation checkpointing as parallel.activation_checkpointing asks
   (trinity.model.checkpointing): before any fully_shard, as torchtitan orders it, so FSDP's
   unshard and reshard stay outside the recomputed regions;
4. `fully_shard(block)` over ("replicate", "shard") for every transformer block, then the root
   (embedding, final norm, head).

Mixed precision: parameters are gathered in bf16 when stability.precision is bf16 and
parallel.param_dtype is bf16, else fp32; gradients are reduced in parallel.reduce_dtype.
Buffers (expert bias and its momentum) stay whole, identical on every rank.

The model must be initialised (or loaded) before this: initialisation after sharding would draw
different random numbers than a single process does.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from trinity.distributed.mesh import Layout
from trinity.model import TrinityModel
from trinity.model.checkpointing import apply_activation_checkpointing
from trinity.spec.parallel import ParallelSpec

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def precision_policy(parallel: ParallelSpec, precision: str) -> MixedPrecisionPolicy:
    param_dtype = DTYPES[parallel.param_dtype] if precision == "bf16" else torch.float32
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[parallel.reduce_dtype])


def parallelize(
    model: TrinityModel, mesh: DeviceMesh, layout: Layout, parallel: ParallelSpec, precision: str
) -> TrinityModel:
    """Shard `model` in place over `mesh` (see the module docstring) and return it."""
    policy = precision_policy(parallel, precision)
    if layout.ep > 1:
        from trinity.distributed.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, mesh["ep"])
    apply_activation_checkpointing(model, parallel)
    for block in model.layers:
        experts = getattr(block.mlp, "experts", None)
        if experts is not None and layout.ep > 1:
            fully_shard(
                experts,
                mesh=mesh["replicate", "shard_mod_ep"],
                mp_policy=policy,
                shard_placement_fn=lambda p: Shard(1),
            )
        fully_shard(block, mesh=mesh["replicate", "shard"], mp_policy=policy)
    fully_shard(model, mesh=mesh["replicate", "shard"], mp_policy=policy)
    return model


def rescale_expert_gradients(model: TrinityModel, layout: Layout) -> None:
    """Divide the routed experts' reduced gradients by ep (see step 2 of the module docstring)."""
    if layout.ep == 1:
        return
    for block in model.layers:
        experts = getattr(block.mlp, "experts", None)
        if experts is None:
            continue
        for p in experts.parameters():
            if p.grad is not None:
                grad = p.grad
                (grad.to_local() if isinstance(grad, DTensor) else grad).div_(layout.ep)
