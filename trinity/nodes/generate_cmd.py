"""`trinity generate RUN --node NODE "prompt"`: sample from a finished training node's final checkpoint.

The node is any training node of the run (pretrain/PHASE, extend, sft, rl). Chat-trained nodes
(sft, rl) get the prompt as a user turn of the chat template and answer until `<|end|>`; the
others continue the raw text until `<|doc|>`. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trinity.data.chat import user_prompt
from trinity.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from trinity.distributed.device import training_device
from trinity.errors import NodeFailure
from trinity.graph.kinds import CHAT_KINDS, TRAINING_KINDS
from trinity.model.generate import generate
from trinity.nodes.upstream import load_final_model
from trinity.rl.rollout import stop_ids
from trinity.run.graph import RunGraph
from trinity.run.layout import RunDir


def generate_cli(
    run_dir: Path, node_id: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> str:
    """The generated continuation of `prompt` (text, stop token not included).

    Raises NodeFailure with what to do next when the node is unknown, not a training node, or unfinished.
    """
    run = RunDir(Path(run_dir).resolve())
    if not run.exists():
        raise NodeFailure(f"{run_dir} is not a run directory (no graph.json)")
    graph = RunGraph.load(run)
    if node_id not in graph:
        known = ", ".join(n for n, e in graph.nodes.items() if e.kind in TRAINING_KINDS)
        raise NodeFailure(f"{node_id!r} is not a node of this run (training nodes: {known})")
    node = graph[node_id]
    if node.kind not in TRAINING_KINDS:
        raise NodeFailure(
            f"{node_id} is a {node.kind} node; generate from a training node ({', '.join(sorted(TRAINING_KINDS))})"
        )
    spec = graph.spec(node)
    model, _ = load_final_model(run.node(node_id), spec.model)
    model = model.to(training_device())
    tokenizers = graph.upstream(node_id, "tokenizer")
    if not tokenizers:
        raise NodeFailure(f"{node_id} has no upstream tokenizer node")
    tok = load_tokenizer(run.node(tokenizers[0].id).outputs / TOKENIZER_FILE)
    ids = user_prompt(tok, prompt) if node.kind in CHAT_KINDS else tok.encode(prompt)
    if not ids:
        raise NodeFailure("the prompt is empty")
    generator = torch.Generator().manual_seed(seed)  # on the host: the same draws whatever the model's device
    stops = stop_ids(tok)
    out = generate(model, [ids], max_new_tokens, temperature, top_p, generator, stops, tok.pad_id)[0]
    if out and out[-1] in stops:
        out = out[:-1]
    return tok.decode(out)
