"""The skeleton every training node runs (pretraining, context extension, SFT, RL).

`TrainingLoop.run(fresh)` is the whole life of a training attempt:

    resume    from the node's newest intact committed checkpoint of its own identity (model,
              optimizer, batch position, RNG, step, tokens), noted in the attempt record; newer
              damaged ones are set aside, logged and recorded as `events` rows of kind
              "checkpoint_damaged" (trinity.nodes.checkpoints); if there is none, `fresh()` starts
              the node (load its upstream checkpoint, or nothing)
    open      this attempt's telemetry writer (rank 0; other ranks log nothing)
    begin     the kind's hook before the first step (RL: the held-out check at step 0)
    steps     one `optimizer_step` after another, each numbered from 1; after each: telemetry rows,
              progress in status.json, the kind's `after_step` (a loss-spike rollback raises
              RestartRequested there), then the ranks agree whether to stop (the stop flag, polled
              only here, between optimizer steps); a checkpoint every `execution.checkpoint.every`
              steps, at the last step and on a stop request (then StopRequested)
    final     a checkpoint at the final step unless one was just committed, the kind's `end` hook
              (its final metrics), telemetry closed, then outputs/final.json (rank 0) and a barrier

A checkpoint is `checkpoint_state()` (model, optimizer and batch position, whatever the kind
holds) plus the process RNG states, step, tokens seen, node identity and phase. Telemetry is
flushed before each one, so the rows of every committed step are on disk when it commits.
Retention follows `execution.checkpoint` (keep_last, keep_every).

Asynchronous checkpoints (`execution.checkpoint.async`; by default on a GPU, not on the CPU): the
state is copied to host memory at the step boundary and a background thread writes and commits it
while the next steps run (trinity.store.checkpoint_async); at most one is in flight, so a checkpoint
due while the previous one is still being written waits for it. Each asynchronous checkpoint records
an `events` row of kind "checkpoint_async" with data {waited_s: seconds the step waited for the
previous save, snapshot_s: seconds the host copy took} (together: how long training was blocked). The
loop waits for the save in flight before final.json is written, before StopRequested is raised and
before an error leaves `run` (a save that failed is raised there, or logged if another error is
already on its way out).

A node kind subclasses TrainingLoop and supplies only its own pieces: `optimizer_step` (one step
of its training, returning at least `loss` and `tokens`), `log_step` (its telemetry rows),
`checkpoint_state` / `load_checkpoint_state` (and `state_template` when its tensors are sharded),
and optionally `progress_values`, `begin`, `after_step`, `around_steps` and `end`. Progress always
holds step, total_steps, loss, tokens, tokens_per_s and `loss_history` (the last LOSS_HISTORY
losses, rounded to 4 digits, oldest first: the sparkline of `trinity watch`). The collectives
(trinity.distributed.step) are plain local calls on a single process, so RL, which runs as one
process, goes through the same code as the distributed language-model trainers.
"""

from __future__ import annotations

import contextlib
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from trinity.distributed import step as collective
from trinity.errors import NodeFailure, StopRequested
from trinity.nodes.checkpoints import (
    Damaged,
    final_state,
    referenced_steps,
    resume_state,
    save_training_state,
    write_final,
)
from trinity.nodes.context import NodeContext
from trinity.nodes.seeds import capture_rng_state, restore_rng_state
from trinity.run.status import AttemptRecord
from trinity.store.checkpoint_async import AsyncCheckpointer
from trinity.store.telemetry import TelemetryWriter

PROGRESS_EVERY_S = 0.5
"""Progress is written to status.json at most this often (and at the last step)."""
LOSS_HISTORY = 48
"""How many of the latest losses progress keeps (`loss_history`)."""


class Report(Protocol):
    """What the loop itself reads of a step's result."""

    @property
    def loss(self) -> float: ...

    @property
    def tokens(self) -> int:
        """Tokens this step trained on (added to the node's running count)."""
        ...


R = TypeVar("R", bound=Report)


class TrainingLoop(ABC, Generic[R]):
    """Steps [step, last_step) of a training node with resume, telemetry, checkpoints and stopping."""

    progress_every_s = PROGRESS_EVERY_S

    def __init__(self, ctx: NodeContext, phase: str, first_step: int, last_step: int, tokens: int = 0) -> None:
        self.ctx, self.phase = ctx, phase
        # `step` optimizer steps are done (the next one is numbered step + 1), `tokens` seen so far.
        self.step, self.last_step, self.tokens = first_step, last_step, tokens
        self.telemetry: TelemetryWriter | None = None
        self.last_checkpoint: Path | None = None
        self._checkpoint_step: int | None = None
        self._last_progress = 0.0
        self._damaged: list[Damaged] = []  # checkpoints the resume set aside: events once telemetry opens
        self._saver: AsyncCheckpointer | None = None  # the asynchronous writer, made by the first async save
        self._losses: deque[float] = deque(maxlen=LOSS_HISTORY)  # this attempt's latest losses, for progress

    # -- what a node kind supplies --------------------------------------------------------------
    @abstractmethod
    def optimizer_step(self) -> R:
        """One optimizer step (the one numbered self.step + 1)."""

    @abstractmethod
    def log_step(self, result: R, seconds: float) -> None:
        """This step's telemetry rows, numbered self.step (called on rank 0 only, with the writer open)."""

    @abstractmethod
    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds of the kind: model, optimizer, batch position."""

    @abstractmethod
    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Undo to `state` (a checkpoint's, loaded into `state_template()`'s layout)."""

    def state_template(self) -> dict[str, Any] | None:
        """The layout a resharding load fills in (None: plain full tensors)."""
        return None

    def progress_values(self, result: R) -> dict[str, Any]:
        """Values beyond step, loss, tokens and throughput that status.json shows."""
        return {}

    def begin(self) -> None:
        """Before the first step of this attempt, with the telemetry writer open."""

    def after_step(self, result: R) -> None:
        """After a step's telemetry and progress, before its checkpoint (every rank; may raise RestartRequested)."""

    def around_steps(self) -> contextlib.AbstractContextManager[None]:
        """A context held while the steps run (activation capture)."""
        return contextlib.nullcontext()

    def end(self, last: R | None) -> dict[str, Any]:
        """After the final checkpoint: the metrics final.json records (`last`: this attempt's last step)."""
        return {}

    # -- the skeleton -----------------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the node's newest committed checkpoint of its identity, if there is one."""
        resumed = resume_latest(self.ctx, self.state_template(), self.load_checkpoint_state, self._damaged)
        if resumed is None:
            return False
        self.step, self.tokens = resumed
        return True

    def run(self, fresh: Callable[[], tuple[int, int] | None] | None = None) -> dict[str, Any]:
        """Resume (or `fresh()`: start the node, returning (step, tokens) when not the plan's), train to
        the last step, commit the final checkpoint and final.json; returns the final metrics."""
        if not self.resume() and fresh is not None:
            start = fresh()
            if start is not None:
                self.step, self.tokens = start
        self.ctx.checks_stop = True  # from here a stop request ends at a checkpoint, between steps
        own_writer = self.telemetry is None and collective.rank() == 0
        if own_writer:
            ctx = self.ctx
            every = ctx.spec.execution.expert_load_every
            self.telemetry = TelemetryWriter(ctx.dir, ctx.node_id, ctx.attempt, ctx.run_id, expert_load_every=every)
        try:
            if self.telemetry is not None:
                for d in self._damaged:
                    self.telemetry.log_event(
                        self.step, "checkpoint_damaged", d.error, checkpoint=str(d.path), damaged_step=d.step,
                        set_aside=str(d.set_aside), resumed_from_step=self.step,
                    )  # fmt: skip
                self._damaged.clear()
            self.begin()
            with self.around_steps():
                last = self._steps()
            if self._checkpoint_step != self.step:
                self.checkpoint()
            metrics = self.end(last)
            self.wait_for_checkpoint()
        except BaseException:
            self._wait_quietly()
            raise
        finally:
            if own_writer and self.telemetry is not None:
                self.telemetry.close()
                self.telemetry = None
        assert self.last_checkpoint is not None
        if collective.rank() == 0:
            write_final(self.ctx.dir, self.last_checkpoint, self.step, self.tokens, metrics)
        collective.barrier()
        return metrics

    def _steps(self) -> R | None:
        last: R | None = None
        self.ctx.steps.begin()  # the stall clock (execution.watchdog) starts with the steps
        while self.step < self.last_step:
            self.ctx.before_step(self.step + 1)  # fault injection (execution.inject: hang_at_step), tests only
            t0 = time.perf_counter()
            result = self.optimizer_step()
            self.step += 1
            self.tokens += result.tokens
            seconds = time.perf_counter() - t0
            if self.telemetry is not None:
                self.log_step(result, seconds)
            self._progress(result, seconds)
            self.after_step(result)
            self.ctx.step_done(self.step, seconds)  # the heartbeat lease carries it (stall detection)
            last = result
            done = self.step >= self.last_step
            stop = collective.any_rank(self.ctx.stop_event.is_set())  # all ranks stop at the same step
            if done or stop or self.step % self.ctx.spec.execution.checkpoint.every == 0:
                self.checkpoint()
            if stop and not done:
                self.wait_for_checkpoint()  # StopRequested promises a committed checkpoint at this step
                raise StopRequested()
        return last

    def checkpoint(self) -> Path:
        """Telemetry first (so it covers every committed step), then the checkpoint (collective)."""
        if self.telemetry is not None:
            self.telemetry.flush()
        state = {
            **self.checkpoint_state(),
            "rng": capture_rng_state(),
            "step": self.step,
            "tokens": self.tokens,
            "identity": self.ctx.node.identity,
            "phase": self.phase,
        }
        policy = self.ctx.spec.execution.checkpoint
        if self._saver is None and (torch.cuda.is_available() if policy.async_ is None else policy.async_):
            self._saver = AsyncCheckpointer()
        protected = referenced_steps(self.ctx)  # steps downstream nodes start from (kept by the pruning)
        self.last_checkpoint = save_training_state(
            self.ctx.dir, self.step, state, policy, protected=protected, saver=self._saver
        )
        self._checkpoint_step = self.step
        if self._saver is not None and self.telemetry is not None:
            waited, copied = round(self._saver.waited_s, 6), round(self._saver.snapshot_s, 6)
            self.telemetry.log_event(self.step, "checkpoint_async", "", waited_s=waited, snapshot_s=copied)
        return self.last_checkpoint

    def wait_for_checkpoint(self) -> None:
        """Block until the asynchronous save in flight (if any) is committed; raise its error if it failed."""
        if self._saver is not None:
            self._saver.wait()

    def _wait_quietly(self) -> None:
        """On an error path: let the save in flight finish (it may commit the newest checkpoint); its own
        failure is printed, not raised, so that the error on its way out is the one reported."""
        try:
            self.wait_for_checkpoint()
        except Exception as exc:
            print(f"trinity: {self.ctx.node_id}: the asynchronous checkpoint also failed: {exc}", file=sys.stderr)

    def _progress(self, result: R, seconds: float) -> None:
        self._losses.append(round(result.loss, 4))
        now = time.monotonic()
        if now - self._last_progress < self.progress_every_s and self.step != self.last_step:
            return
        self._last_progress = now
        self.ctx.progress(
            step=self.step,
            total_steps=self.last_step,
            loss=round(result.loss, 4),
            **self.progress_values(result),
            loss_history=list(self._losses),
            tokens_per_s=round(result.tokens / seconds),
            tokens=self.tokens,
        )


def resume_latest(
    ctx: NodeContext,
    template: dict[str, Any] | None,
    load: Callable[[dict[str, Any]], None],
    damaged: list[Damaged] | None = None,
) -> tuple[int, int] | None:
    """Load the node's newest intact committed checkpoint of its identity with `load`, restore the RNG
    states and note the step in the attempt record; (step, tokens), or None when there is none.
    Newer damaged checkpoints are set aside, logged, and appended to `damaged`."""
    found: list[Damaged] = []
    state = resume_state(ctx.dir, ctx.node.identity, like=template, damaged=found)
    if damaged is not None:
        damaged += found
    if collective.rank() == 0:
        for d in found:
            print(
                f"trinity: {ctx.node_id}: {d.error}; set aside as {d.set_aside.name} (inspect it, then delete it); "
                f"falling back to the previous committed checkpoint",
                flush=True,
            )
    if state is None:
        return None
    load(state)
    restore_rng_state(state["rng"])
    step, tokens = int(state["step"]), int(state["tokens"])
    record_resume(ctx, step)
    return step, tokens


def record_resume(ctx: NodeContext, step: int) -> None:
    """Note in the attempt record (and the log) the checkpoint step this attempt resumed from."""
    if collective.rank() == 0:
        record = AttemptRecord.read(ctx.dir, ctx.attempt)
        record.resumed_from_step = step
        record.write(ctx.dir)
        print(f"trinity: {ctx.node_id}: resuming from the committed checkpoint at step {step}", flush=True)


def verify_training_node(ctx: NodeContext) -> None:
    """SUCCEEDED only if the final checkpoint is committed, loads, is of this identity and finite."""
    state = final_state(ctx.dir)
    if state.get("identity") != ctx.node.identity:
        raise NodeFailure("the final checkpoint belongs to another identity")
    if not all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()):
        raise NodeFailure("the final checkpoint holds non-finite weights")
