"""The device mesh of a training job, built from the `parallel` spec (PAPER.md 8).

World = replicas x fsdp_group ranks. Parameters are sharded (FSDP2) inside an FSDP group and
replicated across groups (HSDP when replicas > 1). Routed experts are split over `ep` ranks carved
out of each FSDP group, as in TorchTitan, so expert parallelism does not reduce data parallelism:

    mesh dims          ("replicate", "shard_mod_ep", "ep")   sizes (replicas, fsdp_group / ep, ep)
    "shard"            = flatten("shard_mod_ep", "ep"): the FSDP group of dense parameters
    dense parameters   fully_shard over ("replicate", "shard")          HSDP, Shard(0)
    expert weights     Shard(0) over "ep" (whole experts per rank), then
                       fully_shard over ("replicate", "shard_mod_ep")   HSDP, Shard(1)

Every rank is data-parallel (reads its own micro-batches); context parallelism is not built yet
(`cp` must be 1 when training runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trinity.errors import LayoutError
from trinity.spec.parallel import ParallelSpec

DIMS = ("replicate", "shard_mod_ep", "ep")


@dataclass(frozen=True)
class Layout:
    """Sizes of the mesh dimensions of one job."""

    replicas: int
    fsdp_group: int
    ep: int

    @property
    def world_size(self) -> int:
        return self.replicas * self.fsdp_group

    @property
    def shard_mod_ep(self) -> int:
        return self.fsdp_group // self.ep

    @property
    def dp_ranks(self) -> int:
        """Ranks that read their own micro-batches: all of them (cp = 1)."""
        return self.world_size

    def describe(self) -> str:
        """E.g. 'HSDP 2 x 2, expert-parallel 2', 'FSDP 8', 'one rank'."""
        if self.world_size == 1:
            return "one rank"
        text = f"HSDP {self.replicas} x {self.fsdp_group}" if self.replicas > 1 else f"FSDP {self.fsdp_group}"
        return text + (f", expert-parallel {self.ep}" if self.ep > 1 else "")


def layout_for(parallel: ParallelSpec, world_size: int, n_experts: int | None = None) -> Layout:
    """Check the launched world against the spec and return its layout (errors name the field)."""
    problems: list[str] = []
    if world_size != parallel.total_ranks:
        problems.append(
            f"parallel.nodes x parallel.gpus_per_node = {parallel.nodes} x {parallel.gpus_per_node} = "
            f"{parallel.total_ranks} ranks, but {world_size} processes were launched"
        )
    if parallel.cp != 1:
        problems.append(f"parallel.cp = {parallel.cp}: context parallelism is not implemented for training yet; use 1")
    if world_size % parallel.fsdp_group:
        problems.append(f"parallel.fsdp_group = {parallel.fsdp_group} must divide the world size ({world_size})")
    if parallel.fsdp_group % parallel.ep:
        problems.append(f"parallel.ep = {parallel.ep} must divide parallel.fsdp_group ({parallel.fsdp_group})")
    if n_experts is not None and parallel.ep > 1 and n_experts % parallel.ep:
        problems.append(f"parallel.ep = {parallel.ep} must divide model.moe.n_experts ({n_experts})")
    if problems:
        raise LayoutError("; ".join(problems))
    return Layout(replicas=world_size // parallel.fsdp_group, fsdp_group=parallel.fsdp_group, ep=parallel.ep)


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    """The 3-D mesh of DIMS with the flattened "shard" dimension registered (needs an initialised process group)."""
    mesh = init_device_mesh(device_type, (layout.replicas, layout.shard_mod_ep, layout.ep), mesh_dim_names=DIMS)
    mesh["shard_mod_ep", "ep"]._flatten("shard")
    return mesh
