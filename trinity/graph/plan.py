"""The plan: the DAG's nodes with their identity and cost, and the experiment's estimates, as JSON."""

from __future__ import annotations

from typing import Any

from trinity.graph.compile import Node, branches, compile_graph, nodes_in_order
from trinity.graph.estimates import Estimates, StageCost, estimate
from trinity.spec.loading import LoadedSpec


def node_cost(node: Node, est: Estimates) -> StageCost | None:
    """The stage cost a training node accounts for (None for CPU-side and eval nodes)."""
    name = {"pretrain": f"pretrain:{node.target}", "extend": "extend", "sft": "sft", "rl": "rl"}.get(node.kind)
    return next((s for s in est.stages if s.stage == name), None)


def build_plan(loaded: LoadedSpec) -> dict[str, Any]:
    """Everything `trinity plan --json` prints."""
    graph = compile_graph(loaded)
    per_branch = {b.label: estimate(b.spec) for b in branches(loaded)}
    first = next(iter(per_branch.values()))
    nodes: list[dict[str, Any]] = []
    total_hours = 0.0
    for node in nodes_in_order(graph):
        # A node's cost is its branch's (a node shared by all branches: the first branch's, whose spec it holds).
        cost = node_cost(node, per_branch[node.branch or next(iter(per_branch))])
        entry = node.to_json()
        if cost is not None:
            entry.update(tokens=cost.tokens, seq_len=cost.seq_len, steps=cost.steps, gpu_hours=cost.gpu_hours)
            total_hours += cost.gpu_hours
        nodes.append(entry)
    plan: dict[str, Any] = {
        "name": loaded.spec.name,
        "description": loaded.spec.description,
        "nodes": nodes,
        "estimates": {**first.to_json(), "graph_gpu_hours": total_hours},
    }
    if loaded.spec.sweep is not None:
        plan["branches"] = [{"label": k, "estimates": v.to_json()} for k, v in per_branch.items()]
    return plan
