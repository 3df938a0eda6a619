"""What each node kind runs, and how its outputs are verified before SUCCEEDED is written.

Bodies are imported only when a node of their kind runs, so a tokenizer node never loads torch's
model code and a missing optional dependency only fails the nodes that need it. The kinds
themselves, and which of them run on several ranks, are `trinity.graph.kinds`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trinity.graph.kinds import NodeKind
from trinity.nodes.context import NodeContext

BODIES: dict[NodeKind, tuple[str, str, str]] = {
    "tokenizer": ("trinity.nodes.data_nodes", "run_tokenizer_node", "verify_tokenizer_node"),
    "prepare": ("trinity.nodes.data_nodes", "run_prepare_node", "verify_prepare_node"),
    "pretrain": ("trinity.nodes.pretrain", "run_pretrain_node", "verify_training_node"),
    "extend": ("trinity.nodes.extend", "run_extend_node", "verify_training_node"),
    "sft": ("trinity.nodes.sft", "run_sft_node", "verify_training_node"),
    "rl": ("trinity.nodes.rl", "run_rl_node", "verify_training_node"),
    "eval": ("trinity.nodes.evals", "run_eval_node", "verify_eval_node"),
    "export": ("trinity.nodes.export", "run_export_node", "verify_export_node"),
}
"""Module, body and verifier of each kind (a test checks every kind of `NODE_KINDS` has one)."""


@dataclass(frozen=True)
class NodeBody:
    run: Callable[[NodeContext], dict[str, Any]]
    verify: Callable[[NodeContext], None]


def node_body(kind: NodeKind) -> NodeBody:
    module_name, run_name, verify_name = BODIES[kind]
    module = importlib.import_module(module_name)
    return NodeBody(getattr(module, run_name), getattr(module, verify_name))
