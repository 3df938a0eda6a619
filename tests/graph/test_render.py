"""Mermaid and dot drawings (trinity/graph/render.py): whatever a node id holds, each label stays one
label, and reading the drawing back gives the ids and edges of the graph.

The readers below follow the two grammars, not the renderer: dot's quoted strings end at the first
double quote that is not preceded by a backslash (Graphviz's lexer: backslash-quote is a quote,
every other character is itself, so a string can never end in a backslash); a Mermaid node is
`ID` + shape + `"label"` + shape, and a quoted label ends at the next double quote. Character
references are decoded as Graphviz (HTML entities) and Mermaid (`#NN;`) decode them.
"""

from __future__ import annotations

import html
import re
from typing import Any

import networkx as nx
import pytest

from tests.conftest import ROOT
from trinity.graph.compile import Node, compile_graph
from trinity.graph.render import to_dot, to_mermaid
from trinity.spec.loading import load_experiment

NASTY_IDS = [
    'eval/a"b@pretrain',
    "eval/x<br/>y@pretrain",
    "eval/<script>alert(1)</script>@sft",
    'eval/q"]; evil[label="pwned"]; x["@rl',
    "eval/close]]}}/]@pretrain",
    "eval/new\nline@pretrain",
    "eval/back\\@pretrain",
    "eval/ends-in-backslash\\",
    "eval/amp&#34;@x",
    "eval/hash#quot;@x",
    "eval/semi;colon -->b@x",
    "prepare/a-b",
    "prepare/a_b",
    "prepare/a.b",
]


def _graph(ids: list[str]) -> nx.DiGraph:
    """Nodes built by hand (the compiler would refuse these ids): a tokenizer feeding each."""
    graph = nx.DiGraph(name='g"x\\')
    graph.add_node("tokenizer", node=Node(id="tokenizer", kind="tokenizer", identity="0" * 64, deps=()))
    for i, node_id in enumerate(ids):
        kind: Any = "prepare" if node_id.startswith("prepare/") else "eval"
        graph.add_node(node_id, node=Node(id=node_id, kind=kind, identity=f"{i:064x}", deps=("tokenizer",)))
        graph.add_edge("tokenizer", node_id)
    return graph


# -- dot ----------------------------------------------------------------------------------------------

DOT_TOKEN = re.compile(r'\s+|"(?P<q>(?:\\"|[^"])*+)"|(?P<id>[A-Za-z0-9_.]+)|(?P<p>->|[{}\[\];,=])')


def dot_tokens(text: str) -> list[tuple[str, str]]:
    """(kind, value) tokens; quoted strings with backslash-quote turned into a quote, as Graphviz does."""
    out, pos = [], 0
    while pos < len(text):
        m = DOT_TOKEN.match(text, pos)
        assert m, f"dot does not tokenize at {text[pos : pos + 40]!r}"
        pos = m.end()
        if m.group("q") is not None:
            out.append(("str", m.group("q").replace('\\"', '"')))
        elif m.group("id") is not None:
            out.append(("id", m.group("id")))
        elif m.group("p") is not None:
            out.append(("p", m.group("p")))
    return out


def read_dot(text: str) -> tuple[str, dict[str, dict[str, str]], set[tuple[str, str]]]:
    """The graph name, node id -> attributes, and edges of the subset of dot `to_dot` writes."""
    toks = dot_tokens(text)
    assert toks[0] == ("id", "digraph") and toks[1][0] == "str" and toks[2] == ("p", "{") and toks[-1] == ("p", "}")
    name = toks[1][1]
    body, nodes, edges = toks[3:-1], {}, set()
    statements: list[list[tuple[str, str]]] = [[]]
    for tok in body:
        if tok == ("p", ";"):
            statements.append([])
        else:
            statements[-1].append(tok)
    for st in (s for s in statements if s):
        if st == [("id", "rankdir"), ("p", "="), ("id", "LR")]:
            continue
        if len(st) == 3 and st[1] == ("p", "->"):
            assert st[0][0] == st[2][0] == "str", st
            edges.add((st[0][1], st[2][1]))
            continue
        assert st[0][0] == "str" and st[1] == ("p", "[") and st[-1] == ("p", "]"), st
        attrs: dict[str, str] = {}
        for pair in _split(st[2:-1]):
            assert len(pair) == 3 and pair[1] == ("p", "="), pair
            attrs[pair[0][1]] = pair[2][1]
        assert set(attrs) == {"shape", "label"}, attrs
        nodes[st[0][1]] = attrs
    return name, nodes, edges


def _split(tokens: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    parts: list[list[tuple[str, str]]] = [[]]
    for tok in tokens:
        if tok == ("p", ","):
            parts.append([])
        else:
            parts[-1].append(tok)
    return parts


def test_dot_reads_back_to_the_ids_and_edges_whatever_the_ids_hold() -> None:
    graph = _graph(NASTY_IDS)
    name, nodes, edges = read_dot(to_dot(graph))
    assert html.unescape(name) == graph.name
    assert {html.unescape(n) for n in nodes} == set(graph.nodes)
    assert {(html.unescape(a), html.unescape(b)) for a, b in edges} == set(graph.edges)
    for node_id, attrs in nodes.items():
        first, second = attrs["label"].split("\\n")  # the only escape sequence: the line break
        assert html.unescape(first) == html.unescape(node_id)
        assert html.unescape(second) == graph.nodes[html.unescape(node_id)]["node"].identity[:8]
        assert "\\" not in first and "\n" not in first


# -- Mermaid ------------------------------------------------------------------------------------------

MERMAID_NODE = re.compile(r'^  (?P<id>[A-Za-z0-9_]+)(?P<l>\[\[|\[/|\{\{|\[)"(?P<label>[^"]*)"(?P<r>\]\]|/\]|\}\}|\])$')
MERMAID_EDGE = re.compile(r"^  (?P<a>[A-Za-z0-9_]+) --> (?P<b>[A-Za-z0-9_]+)$")
PAIRS = {"[[": "]]", "[/": "/]", "{{": "}}", "[": "]"}


def mermaid_unescape(text: str) -> str:
    """Mermaid's entity codes: `#NN;` (decimal) and `#name;` (HTML names)."""
    return re.sub(
        r"#(\d+|[A-Za-z]+);", lambda m: chr(int(m[1])) if m[1].isdigit() else html.unescape(f"&{m[1]};"), text
    )


def read_mermaid(text: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    labels: dict[str, str] = {}
    edges: set[tuple[str, str]] = set()
    for line in lines[1:]:
        if m := MERMAID_NODE.match(line):
            assert PAIRS[m["l"]] == m["r"] and m["id"] not in labels, line
            label = m["label"]
            assert "<" not in label.replace("<br/>", "", 1) and ">" not in label.replace("<br/>", "", 1), line
            labels[m["id"]] = label
        elif m := MERMAID_EDGE.match(line):
            edges.add((m["a"], m["b"]))
        else:
            raise AssertionError(f"not a Mermaid node or edge line: {line!r}")
    return labels, edges


def test_mermaid_reads_back_to_the_ids_and_edges_whatever_the_ids_hold() -> None:
    graph = _graph(NASTY_IDS)
    labels, edges = read_mermaid(to_mermaid(graph))
    by_id = {}
    for mermaid_id, label in labels.items():
        shown_id, identity = label.split("<br/>")
        node_id = mermaid_unescape(shown_id)
        assert graph.nodes[node_id]["node"].identity[:8] == mermaid_unescape(identity)
        by_id[mermaid_id] = node_id
    assert set(by_id.values()) == set(graph.nodes)  # one Mermaid node per node: a-b, a_b and a.b stay apart
    assert {(by_id[a], by_id[b]) for a, b in edges} == set(graph.edges)


@pytest.mark.parametrize("name", ["tiny.yaml", "ablations/rsdb-vs-sequential.yaml"])
def test_drawings_of_real_graphs_read_back(name: str) -> None:
    graph = compile_graph(load_experiment(ROOT / "graphs" / name))
    labels, edges = read_mermaid(to_mermaid(graph))
    assert len(labels) == graph.number_of_nodes() and len(edges) == graph.number_of_edges()
    _, nodes, dot_edges = read_dot(to_dot(graph))
    assert {html.unescape(n) for n in nodes} == set(graph.nodes)
    assert len(dot_edges) == graph.number_of_edges()
    # ids as the compiler makes them are drawn as themselves (only brackets become references)
    assert '"pretrain/phase1' in to_dot(graph) or '"pretrain/main' in to_dot(graph)
