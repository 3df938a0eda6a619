"""The tokenizer and prepare nodes as the scheduler runs them (bodies in tokenize.py and prepare.py)."""

from __future__ import annotations

from typing import Any

from trinity.data.store import open_store
from trinity.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from trinity.errors import NodeFailure
from trinity.nodes.context import NodeContext
from trinity.nodes.prepare import prepare_phase, store_paths
from trinity.nodes.tokenize import run_tokenize
from trinity.run.layout import atomic_write_json
from trinity.spec.data import MixSpec


def run_tokenizer_node(ctx: NodeContext) -> dict[str, Any]:
    spec = ctx.spec
    names = spec.tokenizer.sources or tuple(spec.data.sources)
    sources = {n: spec.data.sources[n] for n in names}
    metrics = run_tokenize(spec.tokenizer, sources, ctx.base_dir, ctx.dir.outputs, spec.seed)
    atomic_write_json(ctx.dir.outputs / "metrics.json", metrics)
    return metrics


def verify_tokenizer_node(ctx: NodeContext) -> None:
    path = ctx.dir.outputs / TOKENIZER_FILE
    if not path.is_file():
        raise NodeFailure(f"{path} was not written")
    tok = load_tokenizer(path)
    if tok.vocab_size > ctx.spec.model.vocab_size:
        raise NodeFailure(f"tokenizer has {tok.vocab_size} tokens; model.vocab_size is {ctx.spec.model.vocab_size}")


def phase_mix(ctx: NodeContext) -> MixSpec:
    """The mix a prepare node tokenizes: a pretraining phase's, or the extension's."""
    target = ctx.node.target
    if target == "extend":
        assert ctx.spec.stages.extend is not None
        return ctx.spec.stages.extend
    return ctx.spec.data.phase(target)


def run_prepare_node(ctx: NodeContext) -> dict[str, Any]:
    tokenizer = ctx.dep_dir("tokenizer").outputs / TOKENIZER_FILE
    metrics = prepare_phase(
        phase_mix(ctx),
        ctx.spec.data.sources,
        tokenizer,
        ctx.base_dir,
        ctx.dir.outputs / "store",
        seed=ctx.spec.seed,
        holdout_documents=ctx.spec.data.holdout_documents,
        workers=2,
    )
    atomic_write_json(ctx.dir.outputs / "metrics.json", metrics)
    return metrics


def verify_prepare_node(ctx: NodeContext) -> None:
    train, heldout = store_paths(ctx.dir.outputs / "store")
    store = open_store(train)
    open_store(heldout)
    if store.n_tokens == 0:
        raise NodeFailure(f"{train} holds no tokens")
