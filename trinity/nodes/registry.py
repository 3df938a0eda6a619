"""Node kinds: what each runs, and how its outputs are verified before SUCCEEDED is written.

Bodies are imported only when a node of their kind runs, so a tokenizer node never loads torch's
model code and a missing optional dependency only fails the nodes that need it.

Kinds in DISTRIBUTED (the language-model trainer's: pretrain, extend, sft) run as one
torch.distributed job of `parallel.nodes x parallel.gpus_per_node` processes; RL, evals and the
data nodes run as one process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trinity.nodes.context import NodeContext, NodeFailure

if TYPE_CHECKING:
    from trinity.spec.experiment import ExperimentSpec

BODIES: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("trinity.nodes.data_nodes", "run_tokenizer_node", "verify_tokenizer_node"),
    "prepare": ("trinity.nodes.data_nodes", "run_prepare_node", "verify_prepare_node"),
    "pretrain": ("trinity.nodes.pretrain", "run_pretrain_node", "verify_training_node"),
    "extend": ("trinity.nodes.extend", "run_extend_node", "verify_training_node"),
    "sft": ("trinity.nodes.sft", "run_sft_node", "verify_training_node"),
    "rl": ("trinity.nodes.rl", "run_rl_node", "verify_training_node"),
    "eval": ("trinity.nodes.evals", "run_eval_node", "verify_eval_node"),
}

DISTRIBUTED = frozenset({"pretrain", "extend", "sft"})
"""Kinds whose body runs on every rank of a torch.distributed job (trinity.nodes.trainer)."""


def node_world_size(kind: str, spec: ExperimentSpec) -> int:
    """Processes an attempt of a node of `kind` runs as: the parallel layout's world size for the
    distributed kinds, 1 for the rest."""
    return spec.parallel.total_ranks if kind in DISTRIBUTED else 1


@dataclass(frozen=True)
class NodeKind:
    run: Callable[[NodeContext], dict[str, Any]]
    verify: Callable[[NodeContext], None]


def node_kind(kind: str) -> NodeKind:
    if kind not in BODIES:

        def not_yet(ctx: NodeContext) -> dict[str, Any]:
            raise NodeFailure(
                f"node kind {kind!r} is not implemented in this version of trinity; "
                "select the nodes to run with --nodes (e.g. --nodes 'pretrain/*')"
            )

        return NodeKind(not_yet, lambda ctx: None)
    module_name, run_name, verify_name = BODIES[kind]
    module = importlib.import_module(module_name)
    return NodeKind(getattr(module, run_name), getattr(module, verify_name))
