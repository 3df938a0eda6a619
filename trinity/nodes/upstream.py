"""What post-training nodes read from upstream: the tokenizer, and a stage's final model.

A node's direct dependencies are in `ctx.dep_dir`; the tokenizer is usually further up (RL depends
on SFT only, evals on the stage they evaluate), so it is found by walking the dependencies in
graph.json transitively. Everything read here is upstream of the node, so it is finished before the
node runs.
"""

from __future__ import annotations

from typing import Any

from trinity.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from trinity.execute.rundir import NodeDir, RunDir, read_json
from trinity.model import TrinityModel
from trinity.nodes.checkpoints import FINAL, final_state
from trinity.nodes.context import NodeContext, NodeFailure
from trinity.spec.model import ModelSpec


def upstream_ids(run: RunDir, node_id: str, kind: str) -> list[str]:
    """Ids of the nodes of `kind` that `node_id` depends on, directly or not (nearest first)."""
    graph = {n["id"]: n for n in read_json(run.graph_json)["nodes"]}
    seen: set[str] = set()
    frontier, found = list(graph[node_id]["deps"]), []
    while frontier:
        nxt = []
        for dep in frontier:
            if dep in seen:
                continue
            seen.add(dep)
            if graph[dep]["kind"] == kind:
                found.append(dep)
            nxt += graph[dep]["deps"]
        frontier = nxt
    return found


def upstream_dir(ctx: NodeContext, kind: str) -> NodeDir:
    ids = upstream_ids(ctx.run, ctx.node_id, kind)
    if not ids:
        raise NodeFailure(f"{ctx.node_id} has no upstream {kind} node")
    return ctx.run.node(ids[0])


def upstream_tokenizer(ctx: NodeContext) -> Tokenizer:
    return load_tokenizer(upstream_dir(ctx, "tokenizer").outputs / TOKENIZER_FILE)


def load_final_model(node_dir: NodeDir, spec: ModelSpec) -> tuple[TrinityModel, dict[str, Any]]:
    """The model of a finished training node (eval mode) and its final.json (step, tokens, ...)."""
    if not (node_dir.outputs / FINAL).is_file():
        raise NodeFailure(f"{node_dir.root} has no final checkpoint; run that node first")
    state = final_state(node_dir)
    model = TrinityModel(spec)
    model.load_state_dict(state["model"])
    model.eval()
    return model, {**read_json(node_dir.outputs / FINAL), "identity": state.get("identity")}
