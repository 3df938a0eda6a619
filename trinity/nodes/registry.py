"""Node kinds: what each runs, and how its outputs are verified before SUCCEEDED is written.

Bodies are imported only when a node of their kind runs, so a tokenizer node never loads torch's
model code and a missing optional dependency only fails the nodes that need it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trinity.nodes.context import NodeContext, NodeFailure

BODIES: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("trinity.nodes.data_nodes", "run_tokenizer_node", "verify_tokenizer_node"),
    "prepare": ("trinity.nodes.data_nodes", "run_prepare_node", "verify_prepare_node"),
    "pretrain": ("trinity.nodes.pretrain", "run_pretrain_node", "verify_training_node"),
    "extend": ("trinity.nodes.extend", "run_extend_node", "verify_training_node"),
    "sft": ("trinity.nodes.sft", "run_sft_node", "verify_training_node"),
    "rl": ("trinity.nodes.rl", "run_rl_node", "verify_training_node"),
    "eval": ("trinity.nodes.evals", "run_eval_node", "verify_eval_node"),
}


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
