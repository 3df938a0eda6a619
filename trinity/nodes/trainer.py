"""The language-model kind of training node: pretraining, context extension and SFT.

`Trainer` is the skeleton of every training node (trinity.nodes.loop: resume, telemetry, cadence,
checkpoints, final.json, progress, stopping) with the language-model pieces: the model, optimizer
and batch source (`build_training`), one optimizer step, and its telemetry rows.

One optimizer step:
  for each micro-batch: forward (intra-document masking from doc ids if the spec asks),
      loss = CE + z_w * z-loss + aux_w * aux-loss, backward(loss / micro-batches);
      expert counts summed, micro-batch CE kept for BatchHet;
  the step's global mean loss (summed over ranks) and the loss-spike decision on it (below);
  clip the global grad norm; refuse a non-finite loss or gradient (nothing of that step is ever
  committed); set the lr from the schedule; optimizer step; expert-bias update once, from the
  step's summed counts, which also gives the step's MaxVio per MoE layer for telemetry; the MoE
  alarms on those (trinity.nodes.alarms: events only).

Loss spikes (stability.spikes, trinity.optim.spikes): the decision is taken on the global mean loss
before the optimizer step, so every rank takes the same one. `warn` writes a "loss_spike" event and
trains on; `skip` also drops the step's update (gradients zeroed: no optimizer step, no expert-bias
update; the batch is consumed, the step and its telemetry row counted, the lr schedule being a pure
function of step and tokens has nothing to undo); `rollback` writes the event, then (every rank, in
`after_step`) waits for the checkpoint in flight, records the rollback in rollbacks.json
(trinity.nodes.rollbacks: the checkpoint step it returns to and the micro-batches to skip) and
raises RestartRequested; the next attempt resumes there and, in `begin`, draws and discards the
skipped window. More skip/rollback actions than stability.spikes.max_actions fail the node. The
detector's window, the number of micro-batches drawn (the data position) and the alarm counters are
part of the checkpoint (key "spikes"), so a resumed node decides exactly as an uninterrupted one.
Only this kind acts on spikes; RL (trinity.nodes.rl) ignores stability.spikes.

Fault injection for tests (execution.inject: spike_at_step, spike_factor): the micro-batches that
step `spike_at_step` draws in the node's original schedule (a data position, computed from where the
node started) get their loss multiplied by spike_factor: a real spike, gradients included. Keyed on
the data position, it is gone once a rollback skipped that window.

On several ranks (torch.distributed, see trinity.distributed): each rank runs its share of the
step's micro-batches (StreamSet: its own data streams), FSDP2 averages the gradients, and the ranks agree once per step
on the gradient norm, the expert counts (so every rank moves the expert bias alike), BatchHet over
all micro-batches of the global step, non-finite losses and whether to stop. Rank 0 alone writes
telemetry, progress and final.json; every rank writes its shards of each checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from trinity.data.loaders import Batch
from trinity.distributed import step as collective
from trinity.distributed.device import (
    PeakMemory,
    autocast,
    model_flops_utilization,
    module_device,
    peak_memory,
    reset_peak_memory,
    synchronize,
    to_device,
)
from trinity.distributed.training import Sharding, build_model, state_template
from trinity.errors import NodeFailure, RestartRequested
from trinity.graph.estimates import flops_per_token
from trinity.model import TrinityModel
from trinity.model.checkpointing import apply_activation_checkpointing
from trinity.model.rope import positions_from_doc_ids
from trinity.nodes.alarms import Alarm, MoEAlarms
from trinity.nodes.checkpoints import final_state, last_committed_step
from trinity.nodes.context import NodeContext
from trinity.nodes.divergence import divergence_advice
from trinity.nodes.loop import TrainingLoop, resume_latest
from trinity.nodes.rollbacks import Rollback, append_rollback, read_rollbacks, windows_to_skip
from trinity.nodes.seeds import restore_rng_state, stream_seed
from trinity.optim.balancing import combine_aux_loss, max_vio, moe_modules, update_expert_biases
from trinity.optim.groups import TrinityOptimizer, build_optimizer
from trinity.optim.spikes import Spike, SpikeDetector
from trinity.store.activations import ActivationCapture
from trinity.store.telemetry import TelemetryWriter


class BatchSource(Protocol):
    """What the loop draws micro-batches from: the pretraining loaders, length-biased extension
    draws, packed SFT conversations (targets -100 wherever no loss is wanted)."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainPlan:
    """What to train: steps [first_step, last_step), batch sizes, the lr rule."""

    phase: str
    first_step: int
    last_step: int
    tokens_seen: int
    seq_len: int
    micro_batch: int
    batch_sequences: Callable[[int], int]
    """Global batch (sequences) given the tokens seen so far."""
    lr_factor: Callable[[int, int], float]
    """Multiplier of the peak lr given (step, tokens seen)."""


@dataclass
class StepResult:
    loss: float
    ce: float
    aux: float
    z: float
    grad_norm: float
    batch_het: float
    tokens: int
    counts_LE: torch.Tensor
    max_vio_L: torch.Tensor | None = None
    """MaxVio per MoE layer, from the expert-bias update (set by `optimizer_step`)."""
    peak_memory: PeakMemory | None = None
    """This rank's peak device memory during the step (set by `optimizer_step`)."""
    spike: Spike | None = None
    """The step's loss was a spike (stability.spikes); `action` says what was done."""
    action: str | None = None
    """warn, skip or rollback when `spike` is set."""
    alarms: list[Alarm] | None = None
    """MoE alarms this step fired (set by `optimizer_step`)."""
    bias_LE: torch.Tensor | None = None
    """The expert biases after this step, on the host (set by `optimizer_step`; None without MoE layers): read
    once per step for the alarms and the telemetry alike."""


class Trainer(TrainingLoop[StepResult]):
    """The language-model kind of training node on the shared skeleton (trinity.nodes.loop).

    telemetry: None lets `run` open (rank 0) and close the attempt's writer; a writer given here is
    used and left open. final_metrics: recorded in final.json beside the final loss.

    The step computes where the model is (trinity.distributed.device.training_device() in a node):
    each micro-batch is moved there, autocast is on that device's type, and telemetry records the
    step's peak memory there and its MFU over parallel.accelerator's declared peak.
    """

    def __init__(
        self,
        ctx: NodeContext,
        model: TrinityModel,
        optimizer: TrinityOptimizer,
        loader: BatchSource,
        plan: TrainPlan,
        telemetry: TelemetryWriter | None = None,
        sharding: Sharding | None = None,
        final_metrics: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(ctx, plan.phase, plan.first_step, plan.last_step, plan.tokens_seen)
        self.training = Training(model, optimizer, loader, sharding)
        self.model, self.optimizer, self.loader, self.plan = model, optimizer, loader, plan
        self.telemetry, self.sharding = telemetry, sharding
        self.stability = ctx.spec.stability
        self.final_metrics = final_metrics or {}
        self.capture: ActivationCapture | None = None
        self.device = module_device(model)
        self.flops_per_token = flops_per_token(ctx.spec.model, plan.seq_len)
        self.spikes = SpikeDetector(self.stability.spikes)
        self.alarms = MoEAlarms(self.stability.alarms)
        self.drawn = 0
        """Global micro-batches drawn from the batch source by this node so far (its data position)."""
        self.origin: tuple[int, int] | None = None
        """(step, tokens) where the node's data began (drawn = 0): the original schedule counts from there."""
        self.rollbacks = 0
        """Rollbacks of this node so far (rollbacks.json, read when the attempt begins)."""
        self._positions: dict[int, tuple[int, int]] = {}
        """step -> (tokens, drawn) of the checkpoints a rollback may return to: this attempt's start and commits."""
        self.inject = ctx.spec.execution.inject
        """execution.inject (tests only): None, or a spike at step spike_at_step of the original schedule."""

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> StepResult:
        plan, stab = self.plan, self.stability
        sequences = plan.batch_sequences(self.tokens)
        n_global = max(1, sequences // plan.micro_batch)
        world = collective.world_size()
        if n_global % world:
            raise NodeFailure(
                f"step {self.step + 1}: the global batch of {sequences} sequences is {n_global} micro-batches of "
                f"parallel.micro_batch = {plan.micro_batch}, which {world} ranks cannot share evenly"
            )
        n_micro = n_global // world
        spiked = self._injected_window()
        micro_ce: list[float] = []
        totals = torch.zeros(4, dtype=torch.float64)  # loss, ce, aux, z
        counts_LE: torch.Tensor | None = None
        non_finite: str | None = None
        for micro in range(n_micro):
            batch = to_device(self.loader.next_batch(), self.device)
            doc_ids = batch.doc_ids_BT if stab.intra_document_masking else None
            positions = (
                positions_from_doc_ids(batch.doc_ids_BT)
                if doc_ids is not None and stab.reset_positions_per_document
                else None
            )
            with autocast(self.device, stab.precision):
                out = self.model(
                    batch.tokens_BT, doc_ids_BT=doc_ids, labels_BT=batch.targets_BT, position_ids_BT=positions
                )
            assert out.ce_loss is not None and out.z_loss_term is not None
            aux = combine_aux_loss(out.aux_loss_per_layer, stab.aux_loss_reduce)
            loss = out.ce_loss + stab.z_loss_weight * out.z_loss_term + stab.aux_loss_weight * aux
            ce = out.ce_loss
            if spiked is not None and spiked[0] <= self.drawn + micro * world + collective.rank() < spiked[1]:
                assert self.inject is not None
                loss, ce = loss * self.inject.spike_factor, ce * self.inject.spike_factor
            values_4 = torch.stack([t.detach().double() for t in (loss, ce, aux, out.z_loss_term)])
            (loss / n_micro).backward()  # FSDP averages over ranks: the mean over the global batch
            values_4 = values_4.cpu()  # one device-to-host copy per micro-batch, after the backward is queued
            if non_finite is None and not math.isfinite(float(values_4[0])):
                non_finite = f"loss is {float(values_4[0])} in micro-batch {micro * world + collective.rank()}"
            micro_ce.append(float(values_4[1]))
            totals += values_4
            counts_LE = out.expert_counts if counts_LE is None else counts_LE + out.expert_counts
        if self.sharding is not None:
            self.sharding.finish_gradients(self.model)
        if collective.any_rank(non_finite is not None):  # every rank raises together: no rank waits alone
            raise self._non_finite(non_finite or "a non-finite loss on another rank")
        mean = collective.sum_over_ranks(totals) / n_global  # the same on every rank: so is the decision
        self.drawn += n_global
        spike = self.spikes.check(self.step + 1, float(mean[0]))
        action = self._spike_action(spike) if spike is not None else None
        clip = stab.grad_clip if stab.grad_clip is not None else float("inf")
        grad_norm = collective.clip_grad_norm(self.model.parameters(), clip)
        if not math.isfinite(grad_norm):
            raise self._non_finite(f"gradient norm is {grad_norm}")
        self.optimizer.set_lr_factor(plan.lr_factor(self.step, self.tokens))  # a pure function: nothing to undo
        if action not in ("skip", "rollback"):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        assert counts_LE is not None
        micro_ce = collective.gather_floats(micro_ce)  # BatchHet over every micro-batch of the global step
        ce_mean = sum(micro_ce) / len(micro_ce)
        return StepResult(
            loss=float(mean[0]),
            ce=float(mean[1]),
            aux=float(mean[2]),
            z=float(mean[3]),
            grad_norm=grad_norm,
            batch_het=max(micro_ce) - ce_mean,
            tokens=n_global * plan.micro_batch * plan.seq_len,
            counts_LE=collective.sum_over_ranks(counts_LE),
            spike=spike,
            action=action,
        )

    # -- loss spikes ------------------------------------------------------------------------------
    def _spike_action(self, spike: Spike) -> str:
        """The action on `spike` (stability.spikes.action); NodeFailure once max_actions are used up."""
        spec = self.stability.spikes
        if spec.action == "warn":
            self.spikes.record(spike.step, "warn")
            return "warn"
        skipped = self.spikes.skipped
        if len(skipped) + self.rollbacks >= spec.max_actions:
            rolled = [r.spike_step for r in read_rollbacks(self.ctx.dir)]
            raise NodeFailure(
                f"step {spike.step}: the loss {spike.loss:.4g} is a spike ({spike.kind} {spike.score:.3g} > "
                f"{spike.threshold}), and stability.spikes.max_actions = {spec.max_actions} actions were taken "
                f"already (steps skipped: {skipped or 'none'}; rolled back at steps: {rolled or 'none'}); the run "
                "is unstable, not unlucky. " + divergence_advice(self.ctx.spec, self.ctx.kind, self.ctx.run.root)
            )
        if spec.action == "skip":
            self.spikes.record(spike.step, "skip")
        return spec.action

    def _injected_window(self) -> tuple[int, int] | None:
        """[first, end) of the global micro-batch positions execution.inject spikes (None: none, or no origin)."""
        inject = self.inject
        if inject is None or inject.spike_at_step is None or self.origin is None:
            return None
        step, tokens = self.origin
        first = 0
        while step + 1 < inject.spike_at_step:
            n = self._micro_batches(tokens)
            first, step, tokens = first + n, step + 1, tokens + n * self.plan.micro_batch * self.plan.seq_len
        return first, first + self._micro_batches(tokens)

    def _micro_batches(self, tokens: int) -> int:
        """Global micro-batches of the step taken with `tokens` seen (as train_step computes it)."""
        return max(1, self.plan.batch_sequences(tokens) // self.plan.micro_batch)

    def begin(self) -> None:
        """Where the data began (a fresh node), the rollbacks so far, and the windows they skip (see
        trinity.nodes.rollbacks): drawn and discarded here, on every rank, before the first step."""
        if self.origin is None and self.drawn == 0:
            self.origin = (self.step, self.tokens)
        rollbacks = read_rollbacks(self.ctx.dir)
        self.rollbacks = len(rollbacks)
        world = collective.world_size()
        for r in windows_to_skip(rollbacks, self.step, self.drawn):
            if r.skip % world:
                raise NodeFailure(
                    f"rollbacks.json: the window of {r.skip} micro-batches skipped after the spike at step "
                    f"{r.spike_step} cannot be shared by {world} ranks; resume with the layout that rolled back"
                )
            for _ in range(r.skip // world):
                self.loader.next_batch()
            self.drawn += r.skip
            if collective.rank() == 0:
                print(
                    f"trinity: {self.ctx.node_id}: skipping the {r.skip} micro-batches of steps "
                    f"{r.to_step + 1}..{r.spike_step} (loss spike at step {r.spike_step}, rolled back)",
                    flush=True,
                )
        self._positions[self.step] = (self.tokens, self.drawn)

    def after_step(self, result: StepResult) -> None:
        """A rollback (every rank): telemetry on disk, the save in flight committed, the rollback recorded, then
        RestartRequested: the next attempt resumes from the last checkpoint and skips the spike's data."""
        if result.action != "rollback" or result.spike is None:
            return
        if self.telemetry is not None:
            self.telemetry.flush()
        self.wait_for_checkpoint()
        to_step = max(self._positions)
        from_drawn = self._positions[to_step][1]
        rollback = Rollback(
            spike_step=result.spike.step,
            loss=result.spike.loss,
            to_step=to_step,
            from_drawn=from_drawn,
            skip=self.drawn - from_drawn,
            attempt=self.ctx.attempt,
        )
        if collective.rank() == 0:
            append_rollback(self.ctx.dir, rollback)
        collective.barrier()
        raise RestartRequested(
            f"loss spike at step {rollback.spike_step} (loss {rollback.loss:.4g}): rolling back to the checkpoint at "
            f"step {to_step}, skipping the {rollback.skip} micro-batches of steps {to_step + 1}..{rollback.spike_step}"
        )

    def _non_finite(self, what: str) -> NodeFailure:
        """The failure of the step being computed (numbered as in telemetry: `self.step` steps are done)."""
        last = last_committed_step(self.ctx.dir)
        where = f"step {last}" if last is not None else "none yet"
        return NodeFailure(
            f"step {self.step + 1}: {what}; nothing of this step was committed (last committed checkpoint: "
            f"{where}). " + divergence_advice(self.ctx.spec, self.ctx.kind, self.ctx.run.root)
        )

    # -- the pieces the skeleton runs ------------------------------------------------------------
    def optimizer_step(self) -> StepResult:
        """train_step, then the expert-bias update once from the step's summed counts (its MaxVio kept)."""
        if self.capture is not None:
            self.capture.begin_step(self.step + 1)  # the step being computed, numbered as in telemetry
        reset_peak_memory(self.device)
        result = self.train_step()
        if self.capture is not None:
            self.capture.end_step()
        if result.action in ("skip", "rollback"):
            result.max_vio_L = max_vio(result.counts_LE)  # measured, but the bias is not moved
        else:
            result.max_vio_L = update_expert_biases(self.model, result.counts_LE, self.stability.balancing)
        layers = moe_modules(self.model)
        if layers:
            result.bias_LE = torch.stack([m.expert_bias.detach().float().cpu() for m in layers])
            result.alarms = self.alarms.observe(self.step + 1, result.counts_LE, result.max_vio_L, result.bias_LE)
        synchronize(self.device)  # the step's time (measured around this call) includes its queued kernels
        result.peak_memory = peak_memory(self.device)
        return result

    def log_step(self, r: StepResult, seconds: float) -> None:
        assert self.telemetry is not None
        # Groups are named muon, adamw_decay and adamw_no_decay; they share the schedule, so one lr per optimizer.
        lrs = {str(g.get("name", "")).split("_")[0]: g["lr"] for g in self.optimizer.param_groups}
        self.telemetry.log_step(
            self.step,
            tokens=self.tokens,
            loss=r.loss,
            ce_loss=r.ce,
            aux_loss=r.aux,
            z_loss=r.z,
            lr_muon=lrs.get("muon"),
            lr_adamw=lrs.get("adamw"),
            grad_norm=r.grad_norm,
            tokens_per_s=r.tokens / seconds,
            step_time_s=seconds,
            batch_het=r.batch_het,
            mfu=model_flops_utilization(
                r.tokens / seconds,
                self.flops_per_token,
                collective.world_size(),
                self.ctx.spec.parallel.accelerator.peak_bf16_tflops,
            ),
            peak_mem_allocated_bytes=r.peak_memory.allocated if r.peak_memory else None,
            peak_mem_reserved_bytes=r.peak_memory.reserved if r.peak_memory else None,
            phase=self.phase,
        )
        if r.bias_LE is not None:
            self.telemetry.log_moe(self.step, r.counts_LE, r.bias_LE, max_vio_L=r.max_vio_L)
        if r.spike is not None:
            s = r.spike
            message = f"loss {s.loss:.4g} is a spike ({s.kind} {s.score:.3g} > {s.threshold}): {r.action}"
            self.telemetry.log_event(self.step, "loss_spike", message, action=r.action, **s.data())
        for alarm in r.alarms or []:
            self.telemetry.log_event(self.step, alarm.kind, alarm.message, **alarm.data)

    def progress_values(self, result: StepResult) -> dict[str, Any]:
        """Gradient norm, the worst layer's MaxVio, spikes flagged so far in the node, alarms of this attempt."""
        worst = float(result.max_vio_L.max()) if result.max_vio_L is not None and result.max_vio_L.numel() else None
        return {
            "grad_norm": round(result.grad_norm, 4),
            "max_vio": round(worst, 4) if worst is not None else None,
            "spikes": len(self.spikes.flagged) + self.rollbacks,
            "alarms": self.alarms.raised,
        }

    def checkpoint_state(self) -> dict[str, Any]:
        self._positions[self.step] = (self.tokens, self.drawn)  # a checkpoint about to be committed here
        spikes = {
            **self.spikes.state_dict(),
            "drawn": self.drawn,
            "origin": list(self.origin) if self.origin is not None else None,
            "alarms": self.alarms.state_dict(),
        }
        return {**self.training.state(), "spikes": spikes}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.training.load_state(state)
        spikes = state.get("spikes") or {}  # a checkpoint from before spike detection: an empty window
        self.spikes.load_state_dict(spikes)
        self.alarms.load_state_dict(spikes.get("alarms"))
        self.drawn = int(spikes.get("drawn", 0))
        origin = spikes.get("origin")
        self.origin = (int(origin[0]), int(origin[1])) if origin is not None else None

    def state_template(self) -> dict[str, Any] | None:
        return self.training.template()

    @contextlib.contextmanager
    def around_steps(self) -> Iterator[None]:
        """Activation capture at `execution.activation_steps` (rank 0), when the spec asks for it."""
        execution = self.ctx.spec.execution
        if not (execution.activations and execution.activation_steps and self.telemetry is not None):
            yield
            return
        names, steps = list(execution.activations), execution.activation_steps
        with ActivationCapture(self.model, names, steps, self.ctx.dir.activations) as self.capture:
            try:
                yield
            finally:
                self.capture = None

    def end(self, last: StepResult | None) -> dict[str, Any]:
        return {"final_loss": last.loss if last else None, "final_ce": last.ce if last else None, **self.final_metrics}


@dataclass
class Training:
    """A node's model, optimizer and batches, sharded over the job's ranks when there are several."""

    model: TrinityModel
    optimizer: TrinityOptimizer
    batches: BatchSource
    sharding: Sharding | None

    def template(self) -> dict[str, Any] | None:
        """The layout a resharding load fills in (None on one process: plain full tensors)."""
        return state_template(self.model, self.optimizer) if self.sharding is not None else None

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds of it: model, optimizer, batch position."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.batches.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["loader"])

    def load_upstream(self, node_dir: Any, optimizer: bool = True) -> dict[str, Any]:
        """Start from another node's final checkpoint: model (and optimizer) state, RNG; returns the state."""
        state = final_state(node_dir, like=self.template())
        self.model.load_state_dict(state["model"])
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        return state


def build_training(ctx: NodeContext, source: BatchSource) -> Training:
    """The model on the training device (built on `meta`, sharded when distributed, each rank's shards
    initialised from the `model/init` stream of spec.seed: the same full weights on any number of
    ranks), activation checkpointing as spec.parallel asks, its optimizer, and `source` (already this
    rank's own streams, trinity.distributed.data.StreamSet). Loads (resume, upstream) come after,
    into the shards."""
    spec = ctx.spec
    model, sharding = build_model(spec, stream_seed(spec.seed, "model/init"))
    if sharding is None:  # on the sharded path parallelize applies it
        apply_activation_checkpointing(model, spec.parallel)
    optimizer = build_optimizer(model, spec.optim)
    return Training(model, optimizer, source, sharding)


def train_to_final(
    ctx: NodeContext,
    training: Training,
    plan: TrainPlan,
    fresh: Callable[[], tuple[int, int] | None] | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Resume or `fresh()`, train `plan`, record the final checkpoint for downstream nodes (the skeleton's `run`)."""
    trainer = Trainer(
        ctx,
        training.model,
        training.optimizer,
        training.batches,
        plan,
        sharding=training.sharding,
        final_metrics=extra_metrics,
    )
    return trainer.run(fresh)


def resume_into(ctx: NodeContext, training: Training) -> tuple[int, int] | None:
    """Restore the node's newest committed checkpoint of its identity; (step, tokens), or None to start fresh."""
    return resume_latest(ctx, training.template(), training.load_state)
