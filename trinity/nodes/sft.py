"""The SFT node (PAPER.md 7): chat data packed to the sequence length, loss on assistant tokens only.

Starts from the model of the stage before (extension, or the last pretraining phase), or of
`stages.sft.init` (trinity.nodes.init_source), with a fresh optimizer state (unless
`init.optimizer`); trains ceil(tokens / (global_batch_sequences x seq_len)) optimizer steps with the
pretraining loop (`Trainer`), fed by `SftBatches` (chat template, packing and loss mask in
`trinity.data.chat`; packing order from the seed stream `loader/sft`; the conversations are shared
out over `data.streams` streams, of which this rank builds only its own: trinity.distributed.data).
Data: every conversation of `stages.sft.chat_sources` plus `math_conversations` built-in ones from
the math generator (problem as the user turn, worked solution ending in `Answer: X` as the
assistant turn).

Learning rate: linear warm-up to `peak_fraction` x the pretraining peak of each optimizer group
over `warmup_steps`, then linear decay to 0 at the last step (`rewarm_factor`).
"""

from __future__ import annotations

from typing import Any

from trinity.data.chat import SftBatches, math_conversation, math_sft_problems, read_chat_jsonl, render, targets_of
from trinity.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from trinity.distributed.data import StreamSet
from trinity.errors import NodeFailure
from trinity.nodes.context import NodeContext, set_threads
from trinity.nodes.init_source import load_init
from trinity.nodes.loop import verify_training_node
from trinity.nodes.seeds import stream_seed
from trinity.nodes.trainer import TrainPlan, build_training, train_to_final
from trinity.optim.schedule import rewarm_factor
from trinity.spec.experiment import ExperimentSpec

__all__ = ["run_sft_node", "verify_training_node"]

PHASE = "sft"


def sft_conversations(spec: ExperimentSpec, tok: Tokenizer, base_dir: Any) -> list[tuple[list[int], list[int]]]:
    """(ids, targets) of every SFT conversation: the JSONL sources, then the built-in math ones."""
    sft = spec.stages.sft
    assert sft is not None
    chats = [c for src in sft.chat_sources for c in read_chat_jsonl(src.paths, base_dir)]
    chats += [math_conversation(p) for p in math_sft_problems(spec.seed, sft.math_conversations)]
    out = []
    for messages in chats:
        ids, trained = render(tok, messages)
        out.append((ids, targets_of(ids, trained)))
    return out


def upstream_training_dir(ctx: NodeContext) -> Any:
    """The folder of the stage SFT continues from: extension if the graph has it, else pretraining."""
    has_extend = ctx.graph.dep(ctx.node_id, "extend") is not None
    return ctx.dep_dir("extend") if has_extend else ctx.dep_dir("pretrain")


def run_sft_node(ctx: NodeContext) -> dict[str, Any]:
    spec = ctx.spec
    sft = spec.stages.sft
    if sft is None:
        raise NodeFailure("the graph has no stages.sft")
    set_threads(ctx)
    tok = load_tokenizer(ctx.dep_dir("tokenizer").outputs / TOKENIZER_FILE)
    try:
        conversations = sft_conversations(spec, tok, ctx.base_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise NodeFailure(str(exc)) from None
    seed, n_streams, micro = stream_seed(spec.seed, "loader/sft"), spec.data.streams, spec.parallel.micro_batch
    try:
        streams = StreamSet(
            lambda s: SftBatches(conversations, sft.seq_len, micro, tok.pad_id, seed, stream=s, n_streams=n_streams),
            n_streams,
        )
    except ValueError as exc:
        raise NodeFailure(str(exc)) from None
    training = build_training(ctx, streams)
    total = sft.optimizer_steps

    def from_upstream_model() -> None:  # a fresh optimizer state
        if sft.init is not None:  # counting starts at 0 either way
            load_init(ctx, sft.init, training, training.template())
        else:
            training.load_upstream(upstream_training_dir(ctx), optimizer=False)

    plan = TrainPlan(
        phase=PHASE,
        first_step=0,
        last_step=total,
        tokens_seen=0,
        seq_len=sft.seq_len,
        micro_batch=spec.parallel.micro_batch,
        batch_sequences=lambda tokens: sft.global_batch_sequences,
        lr_factor=lambda step, tokens: rewarm_factor(step, total, sft.peak_fraction, sft.warmup_steps),
    )
    metrics = {"conversations": len(conversations)}
    return train_to_final(ctx, training, plan, fresh=from_upstream_model, extra_metrics=metrics)
