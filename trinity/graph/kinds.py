"""Node kinds: the one list of what a DAG node can be, and which of them train.

Everything that asks "what kind of node is this?" reads it from here: the compiler orders nodes
by `NODE_KINDS`, the executors size an attempt with `node_world_size`, `plan` and `generate`
know the training kinds by `TRAINING_KINDS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from trinity.spec.experiment import ExperimentSpec

NodeKind = Literal["tokenizer", "prepare", "pretrain", "extend", "sft", "rl", "eval"]
NODE_KINDS: tuple[NodeKind, ...] = get_args(NodeKind)
"""In the order the DAG runs them (ties in a topological sort are broken by it)."""

TRAINING_KINDS: frozenset[str] = frozenset({"pretrain", "extend", "sft", "rl"})
"""Kinds that train the language model and end with a final checkpoint."""

DISTRIBUTED_KINDS: frozenset[str] = frozenset({"pretrain", "extend", "sft"})
"""Kinds whose body runs on every rank of a torch.distributed job (parallel.nodes x gpus_per_node)."""

CHAT_KINDS: frozenset[str] = frozenset({"sft", "rl"})
"""Kinds trained on the chat template (generation prompts them as a user turn)."""


def node_world_size(kind: str, spec: ExperimentSpec) -> int:
    """Processes one attempt of a node of `kind` runs as: the parallel layout's world size for the
    distributed kinds, 1 for the rest."""
    return spec.parallel.total_ranks if kind in DISTRIBUTED_KINDS else 1
