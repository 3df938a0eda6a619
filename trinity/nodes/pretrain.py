"""The pretraining node of one data phase.

Phase 1 initialises the model from the `model/init` stream of the spec's seed (then shards it
over the job's ranks); phase k continues from phase k-1's final checkpoint (model, optimizer
state, expert bias and momentum) on its own data with a fresh loader, seeded from the stream
`loader/pretrain/<phase name>`, drawn from `data.streams` streams of which this rank builds only its
own (trinity.distributed.data). Steps are numbered globally across phases, so the warmup and the
token-based decay of the schedule run over the whole of pretraining. A re-run attempt resumes from
the node's last committed checkpoint of the same identity, exactly (trinity.nodes.loop).

A phase with `init` starts from that source instead (trinity.nodes.init_source) and continues its
step and tokens seen: it trains `tokens` more from there. A phase with its own `lr` rule decays from
`from_fraction` to `to_fraction` of the peak over its own steps instead of following optim.schedule
(a cooldown branch that starts mid-run: docs/guide.md, "Cooldown sweeps").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trinity.data.loaders import build_loader
from trinity.data.store import open_store
from trinity.distributed.data import StreamSet
from trinity.errors import NodeFailure
from trinity.nodes.checkpoints import FINAL
from trinity.nodes.context import NodeContext, set_threads
from trinity.nodes.init_source import find_source, load_init, source_position, stage_init
from trinity.nodes.loop import verify_training_node
from trinity.nodes.prepare import store_paths
from trinity.nodes.seeds import stream_seed
from trinity.nodes.trainer import TrainPlan, build_training, train_to_final
from trinity.optim.schedule import decay_shape, pretrain_lr_factor
from trinity.run.layout import read_json
from trinity.spec.data import ContinueLR

__all__ = ["run_pretrain_node", "verify_training_node"]


def run_pretrain_node(ctx: NodeContext) -> dict[str, Any]:
    spec = ctx.spec
    set_threads(ctx)
    phases = spec.data.phases
    index = next(i for i, p in enumerate(phases) if p.name == ctx.node.target)
    phase = phases[index]
    steps = spec.pretrain_steps()
    first_step, last_step = sum(steps[:index]), sum(steps[: index + 1])
    init = stage_init(ctx)
    if init is not None or any(p.init is not None for p in phases[:index]):
        # Counting continues from where the phase starts (the source, or a previous phase that started
        # from one): the spec alone cannot tell.
        if init is not None:
            first_step, tokens = source_position(find_source(ctx, init))
        else:
            final = read_json(ctx.dep_dir("pretrain", phases[index - 1].name).outputs / FINAL)
            first_step, tokens = int(final["step"]), int(final["tokens"])
        last_step = first_step + spec.optim.batch_steps(tokens, phase.tokens, phase.seq_len)[0]

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

    def from_init() -> tuple[int, int]:
        assert init is not None
        started = load_init(ctx, init, training, training.template())
        return started.step, started.tokens

    total_tokens = spec.data.pretrain_tokens
    lr_factor = phase_lr_factor(phase.lr, first_step, last_step) if phase.lr is not None else None
    plan = TrainPlan(
        phase=phase.name,
        first_step=first_step,
        last_step=last_step,
        tokens_seen=0,
        seq_len=phase.seq_len,
        micro_batch=spec.parallel.micro_batch,
        batch_sequences=spec.optim.batch_sequences_at,
        lr_factor=lr_factor
        or (lambda step, tokens: pretrain_lr_factor(step, tokens, spec.optim.schedule, total_tokens)),
    )
    fresh = from_init if init is not None else from_previous_phase if index > 0 else None
    return train_to_final(ctx, training, plan, fresh=fresh)


def phase_lr_factor(rule: ContinueLR, first_step: int, last_step: int) -> Callable[[int, int], float]:
    """A phase's own rule (`data.phases[i].lr`): from `from_fraction` of the peak at its first step to
    `to_fraction` at its last, linearly or along a half cosine."""
    final, span = rule.to_fraction / rule.from_fraction, max(last_step - first_step - 1, 1)
    return lambda step, tokens: rule.from_fraction * decay_shape((step - first_step) / span, final, rule.decay)
