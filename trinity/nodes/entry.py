"""Run one node attempt in this process: `python -m trinity.nodes.entry RUN NODE --attempt N`.

This is what every executor launches. It marks the node RUNNING, keeps a heartbeat lease, runs
the node's body, verifies its outputs and only then writes SUCCEEDED. A failure is written as
FAILED with one readable message (the traceback goes to the attempt's log). SIGTERM asks the
body to stop: training nodes commit a checkpoint at the next optimizer step and exit.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType

from trinity.execute.run import load_node_spec, load_run_graph
from trinity.execute.rundir import RunDir, read_json
from trinity.execute.status import AttemptRecord, Heartbeat, NodeStatus
from trinity.nodes.context import NodeContext, NodeFailure, StopRequested
from trinity.nodes.registry import node_kind

EXIT_FAILED = 1
EXIT_STOPPED = 3


def run_attempt(run: RunDir, node_id: str, attempt: int, executor: str) -> int:
    """Run the attempt; returns the process exit status."""
    node = load_run_graph(run)[node_id]
    meta = read_json(run.run_json)
    ctx = NodeContext(
        run=run,
        node=node,
        spec=load_node_spec(run, node),
        base_dir=Path(meta["base_dir"]),
        attempt=attempt,
        run_id=meta["run_id"],
        executor=executor,
    )
    node_dir = ctx.dir
    _start_attempt_record(ctx)
    NodeStatus(
        state="RUNNING", identity=node["identity"], attempt=attempt, message=f"running attempt {attempt}", progress={}
    ).write(node_dir)

    def on_term(signum: int, frame: FrameType | None) -> None:
        ctx.stop_event.set()
        if not ctx.checks_stop:
            raise StopRequested()

    signal.signal(signal.SIGTERM, on_term)
    spec = ctx.spec
    kind = node_kind(ctx.kind)
    try:
        with Heartbeat(node_dir, attempt, spec.execution.heartbeat_s):
            kind.run(ctx)
            if ctx.stop_event.is_set() and ctx.checks_stop and not _finished(ctx):
                raise StopRequested()
            kind.verify(ctx)
    except StopRequested:
        message = "stopped on request" + _checkpoint_note(ctx)
        _fail(ctx, message, "STOPPED")
        return EXIT_STOPPED
    except NodeFailure as exc:
        _fail(ctx, str(exc), "FAILED")
        return EXIT_FAILED
    except Exception as exc:
        traceback.print_exc()
        _fail(ctx, f"{type(exc).__name__}: {exc} (traceback in {node_dir.log_file(attempt)})", "FAILED")
        return EXIT_FAILED
    AttemptRecord.read(node_dir, attempt).finish(node_dir, "SUCCEEDED", 0, None, "")
    status = NodeStatus.read(node_dir)
    status.state, status.message = "SUCCEEDED", ""
    status.write(node_dir)
    return 0


def _finished(ctx: NodeContext) -> bool:
    return (ctx.dir.outputs / "final.json").is_file()


def _start_attempt_record(ctx: NodeContext) -> None:
    import os

    path = ctx.dir.attempt_record(ctx.attempt)
    if path.is_file():
        record = AttemptRecord.read(ctx.dir, ctx.attempt)
    else:
        record = AttemptRecord(attempt=ctx.attempt, executor=ctx.executor, identity=str(ctx.node["identity"]))
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
