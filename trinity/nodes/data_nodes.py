"""The tokenizer and prepare nodes as the scheduler runs them (bodies in tokenize.py and prepare.py)."""

from __future__ import annotations

import os
from typing import Any

from trinity.data.positions import Position, end_positions
from trinity.data.store import open_store
from trinity.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from trinity.errors import NodeFailure
from trinity.nodes.context import NodeContext
from trinity.nodes.prepare import prepare_phase, prepare_shard, store_paths
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


def _prepare_args(ctx: NodeContext) -> dict[str, Any]:
    """The arguments of a prepare node's body, from its context: the phase's mix, its tokenizer, where the
    previous phase's prepare (its dependency of kind prepare, if any) left each source, and how to shard."""
    previous: dict[str, Position] | None = None
    if ctx.graph.dep(ctx.node_id, "prepare") is not None:
        previous = end_positions(ctx.dep_dir("prepare").outputs / "store")
    plan = ctx.spec.execution.prepare
    return {
        "mix": phase_mix(ctx),
        "sources": ctx.spec.data.sources,
        "tokenizer_path": ctx.dep_dir("tokenizer").outputs / TOKENIZER_FILE,
        "base_dir": ctx.base_dir,
        "out_dir": ctx.dir.outputs / "store",
        "holdout_documents": ctx.spec.data.holdout_documents,
        "previous": previous,
        "shards": plan.shards,
        "piece_bytes": plan.piece_mb * 10**6,
    }


def run_prepare_node(ctx: NodeContext) -> dict[str, Any]:
    args = _prepare_args(ctx)
    workers = ctx.spec.execution.prepare.workers or min(os.cpu_count() or 1, args["shards"])
    metrics = prepare_phase(**args, seed=ctx.spec.seed, workers=workers)
    atomic_write_json(ctx.dir.outputs / "metrics.json", metrics)
    return metrics


def run_prepare_shard(ctx: NodeContext, shard: int) -> dict[str, Any]:
    """One Slurm array task of a prepare node: tokenize round 1's pieces of `shard` (idempotent)."""
    return prepare_shard(**_prepare_args(ctx), shard=shard)


def verify_prepare_node(ctx: NodeContext) -> None:
    train, heldout = store_paths(ctx.dir.outputs / "store")
    store = open_store(train)
    open_store(heldout)
    if store.n_tokens == 0:
        raise NodeFailure(f"{train} holds no tokens")
