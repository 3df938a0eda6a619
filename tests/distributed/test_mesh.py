"""Layout checks at start: the launched world against the `parallel` spec (no processes needed)."""

from __future__ import annotations

import pytest

from trinity.distributed.mesh import Layout, layout_for
from trinity.errors import LayoutError
from trinity.spec.parallel import ParallelSpec


def test_hsdp_with_expert_parallelism() -> None:
    layout = layout_for(ParallelSpec(nodes=1, gpus_per_node=4, fsdp_group=2, ep=2), 4, n_experts=8)
    assert layout == Layout(replicas=2, fsdp_group=2, ep=2)
    assert (layout.world_size, layout.shard_mod_ep, layout.dp_ranks) == (4, 1, 4)
    assert layout.describe() == "HSDP 2 x 2, expert-parallel 2"


def test_trinity_large_layout() -> None:
    """PAPER.md 8: 2048 GPUs, FSDP groups of 128, experts over 8 GPUs of a node."""
    layout = layout_for(ParallelSpec(nodes=256, gpus_per_node=8, fsdp_group=128, ep=8), 2048, n_experts=256)
    assert (layout.replicas, layout.shard_mod_ep, layout.ep) == (16, 16, 8)


@pytest.mark.parametrize(
    ("spec", "world", "experts", "message"),
    [
        (
            dict(gpus_per_node=4, fsdp_group=2),
            2,
            None,
            "parallel.nodes x parallel.gpus_per_node = 1 x 4 = 4 ranks, but 2",
        ),
        (dict(gpus_per_node=2, fsdp_group=2, cp=2), 2, None, "parallel.cp = 2"),
        (dict(gpus_per_node=4, fsdp_group=4, ep=4), 4, 6, "parallel.ep = 4 must divide model.moe.n_experts (6)"),
    ],
)
def test_mismatches_name_the_field(spec: dict[str, int], world: int, experts: int | None, message: str) -> None:
    with pytest.raises(LayoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layout_for(ParallelSpec(nodes=1, **spec), world, n_experts=experts)
