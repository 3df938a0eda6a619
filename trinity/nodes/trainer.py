"""The language-model kind of training node: pretraining, context extension and SFT.

`Trainer` is the skeleton of every training node (trinity.nodes.loop: resume, telemetry, cadence,
checkpoints, final.json, progress, stopping) with the language-model pieces: the model, optimizer
and batch source (`build_training`), one optimizer step, and its telemetry rows.

One optimizer step:
  for each micro-batch: forward (intra-document masking from doc ids if the spec asks),
      loss = CE + z_w * z-loss + aux_w * aux-loss, backward(loss / micro-batches);
      expert counts summed, micro-batch CE kept for BatchHet;
  clip the global grad norm; refuse a non-finite loss or gradient (nothing of that step is ever
  committed); set the lr from the schedule; optimizer step; expert-bias update once, from the
  step's summed counts, which also gives the step's MaxVio per MoE layer for telemetry.

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
from trinity.errors import NodeFailure
from trinity.graph.estimates import flops_per_token
from trinity.model import TrinityModel
from trinity.model.checkpointing import apply_activation_checkpointing
from trinity.model.rope import positions_from_doc_ids
from trinity.nodes.checkpoints import final_state, last_committed_step
from trinity.nodes.context import NodeContext
from trinity.nodes.loop import TrainingLoop, resume_latest
from trinity.nodes.seeds import restore_rng_state, stream_seed
from trinity.optim.balancing import combine_aux_loss, moe_modules, update_expert_biases
from trinity.optim.groups import TrinityOptimizer, build_optimizer
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

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> StepResult:
        plan, stab = self.plan, self.stability
        sequences = plan.batch_sequences(self.tokens)
        n_global = max(1, sequences // plan.micro_batch)
        world = collective.world_size()
        if n_global % world:
            raise NodeFailure(
                f"step {self.step}: the global batch of {sequences} sequences is {n_global} micro-batches of "
                f"parallel.micro_batch = {plan.micro_batch}, which {world} ranks cannot share evenly"
            )
        n_micro = n_global // world
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
            values_4 = torch.stack([t.detach().double() for t in (loss, out.ce_loss, aux, out.z_loss_term)])
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
        clip = stab.grad_clip if stab.grad_clip is not None else float("inf")
        grad_norm = collective.clip_grad_norm(self.model.parameters(), clip)
        if not math.isfinite(grad_norm):
            raise self._non_finite(f"gradient norm is {grad_norm}")
        self.optimizer.set_lr_factor(plan.lr_factor(self.step, self.tokens))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        assert counts_LE is not None
        mean = collective.sum_over_ranks(totals) / n_global
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
        )

    def _non_finite(self, what: str) -> NodeFailure:
        last = last_committed_step(self.ctx.dir)
        where = f"step {last}" if last is not None else "none yet"
        return NodeFailure(
            f"step {self.step}: {what}; nothing of this step was committed (last committed checkpoint: {where}). "
            "Lower the learning rate (optim.muon.lr, optim.adamw.lr) or tighten stability.grad_clip, then "
            "`trinity resume`."
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
        result.max_vio_L = update_expert_biases(self.model, result.counts_LE, self.stability.balancing)
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
        layers = moe_modules(self.model)
        if layers:
            bias_LE = torch.stack([m.expert_bias for m in layers]).float()
            self.telemetry.log_moe(self.step, r.counts_LE, bias_LE, max_vio_L=r.max_vio_L)

    def checkpoint_state(self) -> dict[str, Any]:
        return self.training.state()

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.training.load_state(state)

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
