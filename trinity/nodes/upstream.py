"""What post-training nodes read from upstream: the tokenizer, and a stage's final model.

A node's direct dependencies are in `ctx.dep_dir`; the tokenizer is usually further up (RL depends
on SFT only, evals on the stage they evaluate), so it is found with `ctx.upstream_dir`. Everything
read here is upstream of the node, so it is finished before the
node runs.
"""

from __future__ import annotations

from typing import Any

from trinity.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from trinity.errors import NodeFailure
from trinity.model import TrinityModel
from trinity.nodes.checkpoints import FINAL, final_state
from trinity.nodes.context import NodeContext
from trinity.run.layout import NodeDir, read_json
from trinity.spec.model import ModelSpec


def upstream_tokenizer(ctx: NodeContext) -> Tokenizer:
    return load_tokenizer(ctx.upstream_dir("tokenizer").outputs / TOKENIZER_FILE)


def load_final_model(node_dir: NodeDir, spec: ModelSpec) -> tuple[TrinityModel, dict[str, Any]]:
    """The model of a finished training node (eval mode) and its final.json (step, tokens, ...)."""
    if not (node_dir.outputs / FINAL).is_file():
        raise NodeFailure(f"{node_dir.root} has no final checkpoint; run that node first")
    state = final_state(node_dir)
    model = TrinityModel(spec)
    model.load_state_dict(state["model"])
    model.eval()
    return model, {**read_json(node_dir.outputs / FINAL), "identity": state.get("identity")}
