"""The pretraining node of one data phase.

Phase 1 initialises the model from the `model/init` stream of the spec's seed (then shards it
over the job's ranks); phase k continues from phase k-1's final checkpoint (model, optimizer
state, expert bias and momentum) on its own data with a fresh loader, seeded from the stream
`loader/pretrain/<phase name>`, drawn from `data.streams` streams of which this rank builds only its
own (trinity.distributed.data). Steps are numbered globally across phases, so the warmup and the
token-based decay of the schedule run over the whole of pretraining. A re-run attempt resumes from
the node's last committed checkpoint of the same identity, exactly (trinity.nodes.loop).
"""

from __future__ import annotations

from typing import Any

from trinity.data.loaders import build_loader
from trinity.data.store import open_store
from trinity.distributed.data import StreamSet
from trinity.errors import NodeFailure
from trinity.nodes.context import NodeContext, set_threads
from trinity.nodes.loop import verify_training_node
from trinity.nodes.prepare import store_paths
from trinity.nodes.seeds import stream_seed
from trinity.nodes.trainer import TrainPlan, build_training, train_to_final
from trinity.optim.schedule import pretrain_lr_factor

__all__ = ["run_pretrain_node", "verify_training_node"]


def run_pretrain_node(ctx: NodeContext) -> dict[str, Any]:
    spec = ctx.spec
    set_threads(ctx)
    phases = spec.data.phases
    index = next(i for i, p in enumerate(phases) if p.name == ctx.node.target)
    phase = phases[index]
    steps = spec.pretrain_steps()
    first_step, last_step = sum(steps[:index]), sum(steps[: index + 1])

    store = open_store(store_paths(ctx.dep_dir("prepare", phase.name).outputs / "store")[0])
    if spec.model.vocab_size < int(store.attrs.get("vocab_size", 0)):
        raise NodeFailure(f"the token store's vocabulary ({store.attrs['vocab_size']}) exceeds model.vocab_size")
    seed = stream_seed(spec.seed, f"loader/pretrain/{phase.name}")
    n_streams, micro = spec.data.streams, spec.parallel.micro_batch
    streams = StreamSet(
        lambda s: build_loader(phase.loader, store, phase.seq_len, micro, rank=s, world=n_streams, seed=seed), n_streams
    )
    training = build_training(ctx, streams)

    def from_previous_phase() -> tuple[int, int]:
        previous = training.load_upstream(ctx.dep_dir("pretrain", phases[index - 1].name))
        return int(previous["step"]), int(previous["tokens"])

    total_tokens = spec.data.pretrain_tokens
    plan = TrainPlan(
        phase=phase.name,
        first_step=first_step,
        last_step=last_step,
        tokens_seen=0,
        seq_len=phase.seq_len,
        micro_batch=spec.parallel.micro_batch,
        batch_sequences=spec.optim.batch_sequences_at,
        lr_factor=lambda step, tokens: pretrain_lr_factor(step, tokens, spec.optim.schedule, total_tokens),
    )
    return train_to_final(ctx, training, plan, fresh=from_previous_phase if index > 0 else None)
