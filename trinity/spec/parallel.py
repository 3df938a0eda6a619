"""The `parallel` section: the GPU layout (HSDP, expert and context parallelism) of training (PAPER.md 8).

Data-parallel ranks are world_size / cp: experts are sharded over `ep` ranks carved out of each
FSDP group (as in TorchTitan), so expert parallelism does not reduce the data-parallel degree.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from trinity.spec.base import SpecModel, execution_only
from trinity.spec.optim import MAX_BATCH_SEQUENCES
from trinity.spec.rules import Rules

MAX_NODES = 2**16
"""Machines (Trinity Large: 256 nodes of 8 B300)."""
MAX_GPUS_PER_NODE = 1024
MAX_RANKS = 2**20
"""World size, FSDP group, expert- and context-parallel degrees."""


class AcceleratorSpec(SpecModel):
    """One GPU (or the CPU) as the estimates see it."""

    name: str = "H200"
    """Accelerator name, for display and the sbatch GPU request."""
    peak_bf16_tflops: PositiveFloat = Field(989.0, le=1e9)
    """Dense bf16 peak, TFLOP/s (H200: 989; B300: ~2250)."""
    memory_gib: PositiveFloat = Field(141.0, le=1e9)
    """Device memory, GiB."""


class ParallelSpec(SpecModel):
    """Layout of the training job. It changes numerics only at rounding level, so it is not part of identity."""

    nodes: PositiveInt = execution_only(1, le=MAX_NODES)
    """Machines."""
    gpus_per_node: PositiveInt = execution_only(8, le=MAX_GPUS_PER_NODE)
    """Accelerators (ranks) per machine."""
    world_size: PositiveInt | None = execution_only(None, le=MAX_RANKS)
    """Optional explicit world size; if given it must equal nodes x gpus_per_node."""
    accelerator: AcceleratorSpec = execution_only(AcceleratorSpec())
    """The accelerator of every rank."""
    fsdp_group: PositiveInt = execution_only(8, le=MAX_RANKS)
    """Ranks that shard parameters, gradients and optimizer state (FSDP); replicated across groups (HSDP)."""
    ep: PositiveInt = execution_only(1, le=MAX_GPUS_PER_NODE)
    """Expert-parallel degree: routed experts are split over this many ranks, within a node."""
    cp: PositiveInt = execution_only(1, le=MAX_RANKS)
    """Context-parallel degree (ranks that split one sequence)."""
    micro_batch: PositiveInt = execution_only(1, le=MAX_BATCH_SEQUENCES)
    """Sequences per rank per forward/backward (micro-batch)."""
    mfu: float = execution_only(0.35, gt=0.0, le=1.0)
    """Model FLOP utilisation assumed for GPU-hour estimates."""
    param_dtype: Literal["bf16", "fp32"] = execution_only("bf16")
    """Dtype of gathered parameters in forward/backward (mixed precision)."""
    reduce_dtype: Literal["fp32", "bf16"] = execution_only("fp32")
    """Dtype of gradient reductions."""
    activation_checkpointing: Literal["none", "full", "selective"] = execution_only("full")
    """Recompute activations in backward, per transformer block: `none` keeps every activation;
    `full` keeps only each block's input and recomputes the block; `selective` recomputes one
    sublayer of each block and keeps the other's activations (`selective_save`). true/false are
    read as full/none."""
    selective_save: Literal["moe", "attention"] = execution_only("moe")
    """With `selective`: the sublayer whose activations are kept (the other one is recomputed).
    [open] The paper does not publish its policy; keeping the MoE (whose recompute repeats the
    expert all-to-all) and recomputing attention is torchtitan's usual trade."""

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, value: object) -> object:
        """true/false (the older boolean form of the field) read as full/none."""
        if isinstance(value, bool):
            return "full" if value else "none"
        return value

    @model_validator(mode="after")
    def _rules(self) -> ParallelSpec:
        rules = Rules()
        product = self.nodes * self.gpus_per_node
        if self.world_size is not None:
            rules.check(
                self.world_size == product,
                "world_size",
                f"= {self.world_size} must equal nodes x gpus_per_node ({self.nodes} x {self.gpus_per_node}"
                f" = {product})",
            )
        rules.check(
            product % self.fsdp_group == 0,
            "fsdp_group",
            f"= {self.fsdp_group} must divide the world size ({product})",
        )
        rules.check(
            self.ep <= self.gpus_per_node and self.gpus_per_node % self.ep == 0,
            "ep",
            f"= {self.ep} must stay within a node: a divisor of gpus_per_node ({self.gpus_per_node})",
        )
        rules.check(
            self.fsdp_group % self.ep == 0,
            "ep",
            f"= {self.ep} must divide fsdp_group ({self.fsdp_group}): experts are sharded inside FSDP groups",
        )
        rules.check(product % self.cp == 0, "cp", f"= {self.cp} must divide the world size ({product})")
        rules.raise_if_any()
        return self

    @property
    def total_ranks(self) -> int:
        """World size: nodes x gpus_per_node."""
        return self.nodes * self.gpus_per_node

    @property
    def replicas(self) -> int:
        """HSDP replicas: world size / FSDP group."""
        return self.total_ranks // self.fsdp_group

    def dp_ranks(self, cp: int | None = None) -> int:
        """Data-parallel ranks (each reads its own sequences) at context-parallel degree `cp`."""
        return self.total_ranks // (cp or self.cp)

    def divides_batch(self, global_batch_sequences: int, cp: int | None = None) -> bool:
        return global_batch_sequences % (self.dp_ranks(cp) * self.micro_batch) == 0
