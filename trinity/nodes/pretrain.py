"""The pretraining node of one data phase.

Phase 1 initialises the model from the spec's seed (then shards it over the job's ranks); phase
k continues from phase k-1's final checkpoint (model, optimizer state, expert bias and momentum)
on its own data with a fresh loader. Steps are numbered globally across phases, so the warmup
and the token-based decay of the schedule run over the whole of pretraining. A re-run attempt
resumes from the node's last committed checkpoint of the same identity, exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from trinity.data.loaders import build_loader
from trinity.data.store import open_store
from trinity.errors import NodeFailure
from trinity.graph.estimates import pretrain_steps
from trinity.nodes.checkpoints import final_state
from trinity.nodes.context import NodeContext
from trinity.nodes.prepare import store_paths
from trinity.nodes.trainer import TrainPlan, build_training, resume_into, train_to_final
from trinity.optim.schedule import pretrain_lr_factor


def set_threads(ctx: NodeContext) -> None:
    threads = ctx.spec.execution.local.threads
    if threads:
        torch.set_num_threads(threads)


def run_pretrain_node(ctx: NodeContext) -> dict[str, Any]:
    spec = ctx.spec
    set_threads(ctx)
    phases = spec.data.phases
    index = next(i for i, p in enumerate(phases) if p.name == ctx.node.target)
    phase = phases[index]
    steps = pretrain_steps(spec)
    first_step, last_step = sum(steps[:index]), sum(steps[: index + 1])

    store = open_store(store_paths(ctx.dep_dir("prepare", phase.name).outputs / "store")[0])
    loader = build_loader(phase.loader, store, phase.seq_len, spec.parallel.micro_batch, seed=spec.seed * 1000 + index)
    training = build_training(ctx, loader)
    tokens_seen = 0
    resumed = resume_into(ctx, training)
    if resumed is not None:
        first_step, tokens_seen = resumed
    elif index > 0:
        previous = training.load_upstream(ctx.dep_dir("pretrain", phases[index - 1].name))
        first_step, tokens_seen = int(previous["step"]), int(previous["tokens"])
    if spec.model.vocab_size < int(store.attrs.get("vocab_size", 0)):
        raise NodeFailure(f"the token store's vocabulary ({store.attrs['vocab_size']}) exceeds model.vocab_size")

    total_tokens = spec.data.pretrain_tokens
    plan = TrainPlan(
        phase=phase.name,
        first_step=first_step,
        last_step=last_step,
        tokens_seen=tokens_seen,
        seq_len=phase.seq_len,
        micro_batch=spec.parallel.micro_batch,
        batch_sequences=spec.optim.batch_sequences_at,
        lr_factor=lambda step, tokens: pretrain_lr_factor(step, tokens, spec.optim.schedule, total_tokens),
    )
    return train_to_final(ctx, training, plan)


def verify_training_node(ctx: NodeContext) -> None:
    """SUCCEEDED only if the final checkpoint is committed, loads, and is at the planned step."""
    state = final_state(ctx.dir)
    if state.get("identity") != ctx.node.identity:
        raise NodeFailure("the final checkpoint belongs to another identity")
    if not all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()):
        raise NodeFailure("the final checkpoint holds non-finite weights")
