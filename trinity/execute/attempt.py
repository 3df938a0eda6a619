"""Run one node attempt in this process: `python -m trinity.execute.attempt RUN NODE --attempt N`.

This is what every executor launches. It marks the node RUNNING, keeps a heartbeat lease, runs
the node's body, verifies its outputs and only then writes SUCCEEDED. A failure is written as
FAILED with one readable message (the traceback goes to the attempt's log). SIGTERM asks the
body to stop: training nodes commit a checkpoint at the next optimizer step and exit.

A training node with several ranks (parallel.nodes x parallel.gpus_per_node) is this module run
once per rank, by torchrun locally or by one Slurm task per rank; the rendezvous comes from the
launcher's environment (trinity.distributed.env). Every rank runs the body; rank 0 alone writes
the status, the attempt record, the heartbeat and progress, and verifies the outputs. Each rank
records how it ended (trinity.run.ranks) before it leaves the process group; rank 0 ends the
attempt as the earliest rank that did not succeed, with that rank's message.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from trinity.distributed.env import destroy_distributed, dist_env, init_distributed
from trinity.errors import NodeFailure, StopRequested
from trinity.graph.kinds import node_world_size
from trinity.nodes.context import NodeContext
from trinity.nodes.registry import node_body
from trinity.run.graph import RunGraph
from trinity.run.layout import RunDir, read_json
from trinity.run.ranks import RankEnd, deciding_end, read_rank_ends, write_rank_end
from trinity.run.status import AttemptRecord, Heartbeat, NodeStatus

EXIT_FAILED = 1
EXIT_STOPPED = 3


@dataclass(frozen=True)
class Outcome:
    state: str
    """SUCCEEDED, FAILED or STOPPED."""
    message: str
    exit_code: int
    time: float = field(default_factory=time.time)


def run_attempt(run: RunDir, node_id: str, attempt: int, executor: str) -> int:
    """Run this process's part of the attempt; returns the process exit status."""
    graph = RunGraph.load(run)
    node = graph[node_id]
    meta = read_json(run.run_json)
    launched = dist_env()
    ctx = NodeContext(
        graph=graph,
        node=node,
        spec=graph.spec(node),
        base_dir=Path(meta["base_dir"]),
        attempt=attempt,
        run_id=meta["run_id"],
        executor=executor,
        rank=launched.rank,
        world_size=launched.world_size,
    )
    if ctx.world_size > 1:
        print(
            f"trinity: {node_id} attempt {attempt}: rank {ctx.rank} of {ctx.world_size} "
            f"on {socket.gethostname()} (pid {os.getpid()})",
            flush=True,
        )
    if ctx.is_primary:
        _start_attempt_record(ctx)
        NodeStatus(
            state="RUNNING",
            identity=node.identity,
            attempt=attempt,
            message=f"running attempt {attempt}",
            progress={},
        ).write(ctx.dir)

    def on_term(signum: int, frame: FrameType | None) -> None:
        ctx.stop_event.set()
        if not ctx.checks_stop:
            raise StopRequested()

    signal.signal(signal.SIGTERM, on_term)
    if executor == "slurm":  # Slurm signals every process of the job: preemption asks for a stop, as SIGTERM
        from trinity.execute.slurm_job import preemption_signal

        signal.signal(preemption_signal(), on_term)
    try:
        outcome = _run_body(ctx)
        signal.signal(signal.SIGTERM, lambda signum, frame: ctx.stop_event.set())  # the end is being written
        return _report(ctx, outcome)
    finally:
        destroy_distributed()  # after the report: a peer that sees us leave finds our reason on disk


def _run_body(ctx: NodeContext) -> Outcome:
    """Join the ranks (if several), run the body on every rank, verify on rank 0."""
    try:
        expected = node_world_size(ctx.kind, ctx.spec)
        if ctx.world_size != expected:
            raise NodeFailure(_world_size_mismatch(ctx, expected))
        if expected > 1:
            init_distributed()
        kind = node_body(ctx.node.kind)
        heartbeat = Heartbeat(ctx.dir, ctx.attempt, ctx.spec.execution.heartbeat_s)
        with heartbeat if ctx.is_primary else contextlib.nullcontext():
            kind.run(ctx)
            if ctx.stop_event.is_set() and ctx.checks_stop and not _finished(ctx):
                raise StopRequested()
            if ctx.world_size > 1:
                import torch.distributed as dist

                dist.barrier()  # every rank's part of the outputs is written before rank 0 verifies them
            if ctx.is_primary:
                kind.verify(ctx)
    except StopRequested:
        return Outcome("STOPPED", "stopped on request" + _checkpoint_note(ctx), EXIT_STOPPED)
    except NodeFailure as exc:
        return Outcome("FAILED", str(exc), EXIT_FAILED)
    except Exception as exc:
        traceback.print_exc()
        where = ctx.dir.log_file(ctx.attempt)
        return Outcome("FAILED", f"{type(exc).__name__}: {exc} (traceback in {where})", EXIT_FAILED)
    return Outcome("SUCCEEDED", "", 0)


def _world_size_mismatch(ctx: NodeContext, expected: int) -> str:
    par = ctx.spec.parallel
    if expected > 1:
        wanted = f"{expected} processes (parallel.nodes x parallel.gpus_per_node = {par.nodes} x {par.gpus_per_node})"
    else:
        wanted = f"1 process (a {ctx.kind} node is not distributed)"
    return (
        f"{ctx.node_id} runs as {wanted}, but was launched as {ctx.world_size}; "
        "launch it through `trinity run` / `trinity resume`, which start the right number"
    )


def _report(ctx: NodeContext, outcome: Outcome) -> int:
    """Record how this rank ended; on rank 0, end the attempt (the deciding rank's state and message)."""
    if ctx.world_size > 1:
        write_rank_end(
            ctx.dir,
            ctx.attempt,
            RankEnd(ctx.rank, outcome.state, outcome.exit_code, outcome.message, outcome.time),
        )
    if not ctx.is_primary:
        if outcome.state != "SUCCEEDED":
            print(f"trinity: {ctx.node_id} attempt {ctx.attempt} rank {ctx.rank}: {outcome.message}", file=sys.stderr)
        return outcome.exit_code
    if ctx.world_size > 1:
        own = RankEnd(0, outcome.state, outcome.exit_code, outcome.message, outcome.time)
        ends = [own, *(e for r, e in read_rank_ends(ctx.dir, ctx.attempt).items() if r != 0)]
        cause = deciding_end(ends)
        if cause is not None and cause.rank != 0 and not (cause.state == own.state == "STOPPED"):
            outcome = Outcome(cause.state, f"rank {cause.rank}: {cause.message}", cause.exit_code, cause.time)
    if outcome.state == "SUCCEEDED":
        AttemptRecord.read(ctx.dir, ctx.attempt).finish(ctx.dir, "SUCCEEDED", 0, None, "")
        status = NodeStatus.read(ctx.dir)
        status.state, status.message = "SUCCEEDED", ""
        status.write(ctx.dir)
        return 0
    _fail(ctx, outcome.message, outcome.state)
    return outcome.exit_code


def _finished(ctx: NodeContext) -> bool:
    return (ctx.dir.outputs / "final.json").is_file()


def _start_attempt_record(ctx: NodeContext) -> None:
    path = ctx.dir.attempt_record(ctx.attempt)
    if path.is_file():
        record = AttemptRecord.read(ctx.dir, ctx.attempt)
    else:
        record = AttemptRecord(attempt=ctx.attempt, executor=ctx.executor, identity=ctx.node.identity)
    record.pid = os.getpid()
    record.write(ctx.dir)


def _checkpoint_note(ctx: NodeContext) -> str:
    from trinity.nodes.checkpoints import last_committed_step

    step = last_committed_step(ctx.dir)
    return f"; last committed checkpoint at step {step}" if step is not None else ""


def _fail(ctx: NodeContext, message: str, state: str) -> None:
    print(f"trinity: {ctx.node_id} attempt {ctx.attempt}: {message}", file=sys.stderr)
    # The body may have updated the record (resumed_from_step): finish what is on disk.
    AttemptRecord.read(ctx.dir, ctx.attempt).finish(ctx.dir, state, None, None, message)
    status = NodeStatus.read(ctx.dir)
    status.state, status.message = "FAILED", message
    status.write(ctx.dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("node_id")
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--executor", default="local")
    args = parser.parse_args(argv)
    return run_attempt(RunDir(args.run_dir.resolve()), args.node_id, args.attempt, args.executor)


if __name__ == "__main__":
    sys.exit(main())
