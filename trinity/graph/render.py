"""Draw the DAG as Mermaid or Graphviz dot text."""

from __future__ import annotations

import re

import networkx as nx

from trinity.graph.compile import nodes_in_order

SHAPES = {"tokenizer": ("[[", "]]"), "prepare": ("[/", "/]"), "eval": ("{{", "}}")}


def _safe(node_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", node_id)


def to_mermaid(graph: nx.DiGraph) -> str:
    lines = ["flowchart LR"]
    for node in nodes_in_order(graph):
        left, right = SHAPES.get(node.kind, ("[", "]"))
        lines.append(f'  {_safe(node.id)}{left}"{node.id}<br/>{node.identity[:8]}"{right}')
    for a, b in sorted(graph.edges):
        lines.append(f"  {_safe(a)} --> {_safe(b)}")
    return "\n".join(lines) + "\n"


def to_dot(graph: nx.DiGraph) -> str:
    shapes = {"tokenizer": "box3d", "prepare": "parallelogram", "eval": "hexagon"}
    lines = [f'digraph "{graph.name or "trinity"}" {{', "  rankdir=LR;"]
    for node in nodes_in_order(graph):
        shape = shapes.get(node.kind, "box")
        lines.append(f'  "{node.id}" [shape={shape}, label="{node.id}\\n{node.identity[:8]}"];')
    for a, b in sorted(graph.edges):
        lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines) + "\n"
