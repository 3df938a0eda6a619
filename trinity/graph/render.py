"""Draw the DAG as Mermaid or Graphviz dot text.

Node ids are validated names joined by '/', '@' and a '[branch]' label, but the text a drawing
shows is escaped anyway, so that no id (a quote, '<', '>', ']', a newline, a backslash) can end a
label or a quoted string early: every character outside a small safe set is written as a
character reference, `#34;` in Mermaid and `&#34;` in dot (both render as the character).
"""

from __future__ import annotations

import re

import networkx as nx

from trinity.graph.compile import nodes_in_order

SHAPES = {"tokenizer": ("[[", "]]"), "prepare": ("[/", "/]"), "eval": ("{{", "}}"), "export": ("[(", ")]")}
DOT_SHAPES = {"tokenizer": "box3d", "prepare": "parallelogram", "eval": "hexagon", "export": "cylinder"}
SAFE_TEXT = re.compile(r"[A-Za-z0-9 _./@=+,~:-]")
"""Characters written as themselves in a label; every other one becomes a character reference."""


def _escape(text: str, entity: str) -> str:
    """`text` with each character outside SAFE_TEXT written as `entity % code point`."""
    return "".join(c if SAFE_TEXT.fullmatch(c) else entity % ord(c) for c in text)


def mermaid_text(text: str) -> str:
    """Text for inside a quoted Mermaid label: Mermaid's entity codes (`#34;` for '"')."""
    return _escape(text, "#%d;")


def dot_text(text: str) -> str:
    """Text for inside a double-quoted dot string: HTML character references (`&#34;` for '"').

    A backslash is escaped too: dot reads the pair backslash-quote as a quote even after another
    backslash, so a string ending in a backslash could never be closed.
    """
    return _escape(text, "&#%d;")


def _mermaid_ids(graph: nx.DiGraph) -> dict[str, str]:
    """A distinct Mermaid id per node: the id with characters other than letters, digits and '_' as
    '_', numbered on a clash (`a-b` and `a_b` would otherwise be drawn as one node). Node ids start
    with their kind, so none is a Mermaid keyword (`end`, `graph`) or starts an edge (`o`, `x`)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for node_id in sorted(graph.nodes):
        base = re.sub(r"[^A-Za-z0-9_]", "_", node_id)
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        out[node_id] = name
    return out


def to_mermaid(graph: nx.DiGraph) -> str:
    ids = _mermaid_ids(graph)
    lines = ["flowchart LR"]
    for node in nodes_in_order(graph):
        left, right = SHAPES.get(node.kind, ("[", "]"))
        lines.append(f'  {ids[node.id]}{left}"{mermaid_text(node.id)}<br/>{mermaid_text(node.identity[:8])}"{right}')
    for a, b in sorted(graph.edges):
        lines.append(f"  {ids[a]} --> {ids[b]}")
    return "\n".join(lines) + "\n"


def to_dot(graph: nx.DiGraph) -> str:
    lines = [f'digraph "{dot_text(graph.name or "trinity")}" {{', "  rankdir=LR;"]
    for node in nodes_in_order(graph):
        shape = DOT_SHAPES.get(node.kind, "box")
        label = f"{dot_text(node.id)}\\n{dot_text(node.identity[:8])}"
        lines.append(f'  "{dot_text(node.id)}" [shape={shape}, label="{label}"];')
    for a, b in sorted(graph.edges):
        lines.append(f'  "{dot_text(a)}" -> "{dot_text(b)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"
