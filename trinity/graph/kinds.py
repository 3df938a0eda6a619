"""Node kinds (the one list of what a DAG node can be, and which of them train), and the header
every view of a node shares.

Everything that asks "what kind of node is this?" reads it from here: the compiler orders nodes
by `NODE_KINDS`, the executors size an attempt with `node_world_size`, `plan` and `generate`
know the training kinds by `TRAINING_KINDS`. A node as compiled (`graph.compile.Node`) and as a
run directory holds it (`run.graph.GraphNode`) both extend `NodeHeader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from trinity.spec.experiment import ExperimentSpec

NodeKind = Literal["tokenizer", "prepare", "pretrain", "extend", "sft", "rl", "eval", "export"]
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


@dataclass(frozen=True)
class NodeHeader:
    """What identifies a node and places it in the DAG."""

    id: str
    """Unique, readable id: kind/name, with a [branch] label when a sweep makes it differ."""
    kind: NodeKind
    identity: str
    """sha256 of the result-affecting spec fields and the upstream identities."""
    deps: tuple[str, ...]
    """Ids of the nodes whose outputs this one reads."""
    target: str = ""
    """What the node works on: a phase name, a stage name, an eval's stage reference."""
    branch: str = ""
    """The sweep branch label ('' for the only branch)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "identity": self.identity,
            "deps": list(self.deps),
            "target": self.target,
            "branch": self.branch,
        }
