"""The context-extension node (PAPER.md 6): continue pretraining at a longer sequence length.

Starts from the last pretraining phase's final checkpoint (model, optimizer state, expert bias and
momentum), or from `stages.extend.init` (trinity.nodes.init_source), and trains `stages.extend.tokens`
tokens at `stages.extend.seq_len` on the prepare/extend store, from the seed stream `loader/extend`, by
`data.streams` streams of which this rank builds only its own (trinity.distributed.data). Documents are
sampled as `stages.extend.sampling` says: the paper's rule (`inclusion`: each document once per pass with a
probability that grows with its length, `trinity.data.inclusion`), or, unset, drawn with replacement with a
length bias (`long_doc_bias`, `trinity.data.length_biased`).

"Only the global layers are treated as changed": global layers use no positional encoding, so a
longer context needs no change to them beyond training; local layers keep their RoPE theta and
their sliding window (both come from the unchanged model spec), so no RoPE scaling or
interpolation is applied anywhere. All weights keep training.

Learning rate (`stages.extend.lr`), as a multiplier of each optimizer group's pretraining peak:
- rewarm: linear warm-up to `peak_fraction` over `warmup_steps`, then linear decay to 0 (Nano, Mini);
- continue: from `from_fraction` to `to_fraction` along a linear or cosine decay (Large).
Steps are numbered from 0 within the stage: ceil(tokens / (global_batch_sequences x seq_len)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trinity.data.inclusion import InclusionLoader
from trinity.data.length_biased import LengthBiasedLoader
from trinity.data.packing import PackedLoader
from trinity.data.store import open_store
from trinity.distributed.data import StreamSet
from trinity.errors import NodeFailure
from trinity.nodes.context import NodeContext, set_threads
from trinity.nodes.init_source import load_init
from trinity.nodes.loop import verify_training_node
from trinity.nodes.prepare import store_paths
from trinity.nodes.seeds import stream_seed
from trinity.nodes.trainer import TrainPlan, build_training, train_to_final
from trinity.optim.schedule import decay_shape, rewarm_factor
from trinity.spec import data as data_spec
from trinity.spec.stages import ExtendSpec, RewarmLR

__all__ = ["run_extend_node", "verify_training_node"]

PHASE = "extend"


def extend_lr_factor(ext: ExtendSpec, total_steps: int) -> Callable[[int, int], float]:
    """The stage's multiplier of the pretraining peak, as a function of (step, tokens seen)."""
    rule = ext.lr
    if isinstance(rule, RewarmLR):
        return lambda step, tokens: rewarm_factor(step, total_steps, rule.peak_fraction, rule.warmup_steps)
    final = rule.to_fraction / rule.from_fraction
    return lambda step, tokens: rule.from_fraction * decay_shape(step / max(total_steps - 1, 1), final, rule.decay)


def build_extend_loader(
    ext: ExtendSpec, store: Any, micro_batch: int, seed: int, stream: int = 0, n_streams: int = 1
) -> PackedLoader:
    """Stream `stream` of `n_streams`, packed as the stage's loader spec says (RSDB buffer or sequential):
    the paper's inclusion passes when `sampling` is set, else length-biased draws with replacement."""
    loader = ext.loader
    buffer = loader.buffer_size if isinstance(loader, data_spec.RsdbLoader) else 0
    if ext.sampling is not None:
        return InclusionLoader(
            store,
            ext.seq_len,
            micro_batch,
            ext.sampling,
            rank=stream,
            world=n_streams,
            workers=loader.workers,
            seed=seed,
            buffer_size=buffer,
        )
    return LengthBiasedLoader(
        store,
        ext.seq_len,
        micro_batch,
        ext.long_doc_bias,
        rank=stream,
        world=n_streams,
        workers=loader.workers,
        seed=seed,
        buffer_size=buffer,
    )


def run_extend_node(ctx: NodeContext) -> dict[str, Any]:
    spec = ctx.spec
    ext = spec.stages.extend
    if ext is None:
        raise NodeFailure("the graph has no stages.extend")
    set_threads(ctx)
    store = open_store(store_paths(ctx.dep_dir("prepare", "extend").outputs / "store")[0])
    if spec.model.vocab_size < int(store.attrs.get("vocab_size", 0)):
        raise NodeFailure(f"the token store's vocabulary ({store.attrs['vocab_size']}) exceeds model.vocab_size")
    n_streams, micro, seed = spec.data.streams, spec.parallel.micro_batch, stream_seed(spec.seed, "loader/extend")
    streams = StreamSet(lambda s: build_extend_loader(ext, store, micro, seed, s, n_streams), n_streams)
    training = build_training(ctx, streams)
    total = ext.optimizer_steps

    def from_pretraining() -> None:
        training.load_upstream(ctx.dep_dir("pretrain"))

    def from_init() -> None:  # counting starts at 0 as from pretraining
        assert ext.init is not None
        load_init(ctx, ext.init, training, training.template())

    plan = TrainPlan(
        phase=PHASE,
        first_step=0,
        last_step=total,
        tokens_seen=0,
        seq_len=ext.seq_len,
        micro_batch=spec.parallel.micro_batch,
        batch_sequences=lambda tokens: ext.global_batch_sequences,
        lr_factor=extend_lr_factor(ext, total),
    )
    return train_to_final(ctx, training, plan, fresh=from_init if ext.init is not None else from_pretraining)
