"""What a training node does differently when it runs on several ranks.

    model, sharding = build_model(spec, seed)       # sharding None on a single process
    optimizer = build_optimizer(model, spec.optim)  # over the sharded parameters
    like = state_template(model, optimizer)         # target layout for resharding loads

`build_model` never holds the whole model on a rank: it builds it on the `meta` device, shards it
(`shard_for_training`: mesh, expert parallelism, FSDP2), then materialises each rank's shards on
the training device and initialises them (trinity.model.transformer.init_weights, whose draws
depend only on the seed, the parameter and the element's index, so 1, 2 or N ranks start from
the same full weights). Loads (resume, upstream) come after, into the shards.

Checkpoints stay one Zarr store written by all ranks (trinity.store.checkpoint); `like` tells
the loader which piece of each stored array this rank needs, so a checkpoint written by N ranks
resumes on M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from trinity.distributed.device import training_device
from trinity.distributed.mesh import Layout, build_mesh, layout_for
from trinity.distributed.parallelize import parallelize, rescale_expert_gradients
from trinity.distributed.step import distributed, rank, world_size
from trinity.model import TrinityModel, init_weights
from trinity.optim.groups import TrinityOptimizer
from trinity.spec.experiment import ExperimentSpec


@dataclass(frozen=True)
class Sharding:
    """This rank's place in the job."""

    layout: Layout
    mesh: DeviceMesh
    rank: int

    def finish_gradients(self, model: TrinityModel) -> None:
        """After the step's backward passes: make every gradient the mean over the global batch."""
        rescale_expert_gradients(model, self.layout)


def shard_for_training(spec: ExperimentSpec, model: TrinityModel) -> Sharding | None:
    """Check the world against spec.parallel, build the mesh and shard `model` (None on one process).

    `model` may live on the meta device (build_model) or hold real weights (identical on every rank).
    """
    if not distributed():
        return None
    n_experts = spec.model.moe.n_experts if spec.model.moe is not None else None
    layout = layout_for(spec.parallel, world_size(), n_experts)
    mesh = build_mesh(layout, training_device().type)
    parallelize(model, mesh, layout, spec.parallel, spec.stability.precision)
    return Sharding(layout, mesh, rank())


def build_model(spec: ExperimentSpec, seed: int) -> tuple[TrinityModel, Sharding | None]:
    """The model of `spec` on this rank's training device, sharded when distributed, initialised from `seed`.

    Built on `meta` (no memory), sharded there, then `to_empty` allocates only this rank's shards
    (and the small unsharded buffers) and `init_weights` fills them: no rank ever holds the full
    parameter set, and the full weights are the same for every layout, one process included.
    """
    with torch.device("meta"):
        model = TrinityModel(spec.model)  # init_weights skips a meta model
    sharding = shard_for_training(spec, model)
    model.to_empty(device=training_device())
    init_weights(model, seed)
    return model, sharding


def state_template(model: TrinityModel, optimizer: TrinityOptimizer) -> dict[str, Any]:
    """{"model", "optimizer"} state dicts shaped like a trained job's, with this job's shards.

    A fresh optimizer has no state yet, so its entries are zeros shaped like the parameters (the
    AdamW step count a plain tensor); only the layout matters to a resharding load.
    """
    optim_state: dict[str, Any] = {}
    for name, opt in (("muon", optimizer.muon), ("adamw", optimizer.adamw)):
        if opt is None:
            optim_state[name] = None
            continue
        state = opt.state_dict()
        params = [p for group in opt.param_groups for p in group["params"]]
        indices = [i for group in state["param_groups"] for i in group["params"]]
        for index, p in zip(indices, params, strict=True):
            if name == "muon":
                state["state"][index] = {"momentum_buffer": torch.zeros_like(p)}
            else:
                state["state"][index] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        optim_state[name] = state
    return {"model": model.state_dict(), "optimizer": optim_state}
