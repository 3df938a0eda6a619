"""What a training node does differently when it runs on several ranks.

    model = TrinityModel(spec.model); init or load it as a single process would
    sharding = shard_for_training(spec, model)        # None on a single process
    optimizer = build_optimizer(model, spec.optim)    # over the sharded parameters
    like = state_template(model, optimizer)           # target layout for resharding loads
    batches = sharding.slice(loader) if sharding else loader

Checkpoints stay one Zarr store written by all ranks (trinity.store.checkpoint); `like` tells
the loader which piece of each stored array this rank needs, so a checkpoint written by N ranks
resumes on M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from trinity.distributed.data import RankSlice
from trinity.distributed.mesh import Layout, build_mesh, layout_for
from trinity.distributed.parallelize import parallelize, rescale_expert_gradients
from trinity.distributed.step import distributed, rank, world_size
from trinity.model import TrinityModel
from trinity.optim.groups import TrinityOptimizer
from trinity.spec.experiment import ExperimentSpec


@dataclass(frozen=True)
class Sharding:
    """This rank's place in the job."""

    layout: Layout
    mesh: DeviceMesh
    rank: int

    def slice(self, source: Any) -> RankSlice:
        """This rank's micro-batches of the global stream of `source`."""
        return RankSlice(source, self.rank, self.layout.dp_ranks)

    def finish_gradients(self, model: TrinityModel) -> None:
        """After the step's backward passes: make every gradient the mean over the global batch."""
        rescale_expert_gradients(model, self.layout)


def shard_for_training(spec: ExperimentSpec, model: TrinityModel) -> Sharding | None:
    """Check the world against spec.parallel, build the mesh and shard `model` (None on one process)."""
    if not distributed():
        return None
    n_experts = spec.model.moe.n_experts if spec.model.moe is not None else None
    layout = layout_for(spec.parallel, world_size(), n_experts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = build_mesh(layout, device)
    parallelize(model, mesh, layout, spec.parallel, spec.stability.precision)
    return Sharding(layout, mesh, rank())


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
