"""A traced plan: one real training step of a spec's own code at its full world size, on no memory.

`trinity plan GRAPH --trace` asks what one rank of the launched job will hold, without the job's
GPUs: this process plays rank 0 of a fake process group of the spec's world size (torch's "fake"
backend: collectives return at once, moving nothing) and runs one training step under
FakeTensorMode (tensors carry shapes, dtypes and devices, never data), as torchtitan's
scripts/estimate/estimation.py does:

    build      TrinityModel(spec.model) on the meta device (no weights anywhere)
    shard      `parallelize` as training does: expert parallelism, FSDP2/HSDP per block, activation
               checkpointing per parallel.activation_checkpointing when it applies it
    materialise  `to_empty` on the (fake) CPU: only this rank's shards, then FSDP's lazy init (which
               moves each shard into its padded buffer; left to the first forward, the tracker
               would count every shard twice)
    optimizer  TrinityOptimizer (Muon + AdamW) over the shards, its state loaded from
               `state_template` (zeros of the state's shapes): a run holds it from its second step on
    trace      under FSDPMemTracker (MemTracker for one process): the trainer's micro-batch (forward under the trainer's
               autocast with intra-document masks when the spec asks for them, CE + z-loss + aux
               loss, backward), the expert-gradient rescale, the optimizer step (Muon's sharded
               Newton-Schulz included: rank 0 owns its share of whole matrices)

and reads, per rank: parameter, gradient and optimizer-state bytes (what the tracker counts as
sharded parameters, sharded gradients and optimizer state, incl. padding), the activation peak
(activations and backward temporaries together at their highest) and the peak of everything.

What the trace cannot see, it fixes and says so (`TraceReport.assumptions`):
- routing is data-dependent (the per-expert counts and the all-to-all splits that follow from
  them); the trace routes T*K / E rows to every expert (`trinity.model.moe.balanced_routing`);
- the global gradient-norm clip reads a number (a host sync on data) and is skipped: its
  temporaries are one gradient's square at a time;
- one micro-batch (gradient accumulation holds no more than its first micro-batch does);
- the caching allocator's fragmentation and the communication libraries' buffers are not counted.

The fake device is the CPU (see DEVICE), so the traced code paths are the CPU's where they differ
(attention kernels, the head loss's reused scratch buffers). The head loss's backward reads its
incoming gradients as numbers; on fake ones it takes the path of a step whose guess held.

A stage whose layout training cannot run (context parallelism: cp > 1) is reported with the reason
instead of figures. Stages are traced in parallel processes when there are CPUs for it. Nothing
here touches a real device or a real process group: the caller must not have one initialised.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.testing._internal.distributed.fake_pg import FakeStore

from trinity.distributed.device import HOST
from trinity.distributed.mesh import Layout, build_mesh, layout_for
from trinity.distributed.parallelize import parallelize, rescale_expert_gradients
from trinity.distributed.training import state_template
from trinity.errors import TrinityError
from trinity.model import TrinityModel, head_loss
from trinity.model.moe import balanced_routing
from trinity.model.rope import positions_from_doc_ids
from trinity.optim.balancing import combine_aux_loss
from trinity.optim.groups import TrinityOptimizer, build_optimizer
from trinity.spec.experiment import ExperimentSpec

DEVICE = HOST
"""The fake device. CPU, because autocast on CUDA turns itself off where torch sees no GPU (bf16
activations would be traced as fp32); a fake CPU tensor has the same sizes a CUDA one would."""

ASSUMPTIONS = (
    "routing perfectly balanced (every expert receives T*K/E rows; real routing is data-dependent)",
    "gradient-norm clipping not traced (it reads a number)",
    "one micro-batch per step; allocator fragmentation and communication buffers not counted",
)


@dataclass(frozen=True)
class StageTrace:
    """Bytes one rank holds in one training step of a stage, or why the stage was not traced."""

    stage: str
    seq_len: int
    world_size: int
    layout: dict[str, Any]
    param_bytes: int | None = None
    grad_bytes: int | None = None
    optimizer_bytes: int | None = None
    activation_peak_bytes: int | None = None
    peak_bytes: int | None = None
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TraceReport:
    """The traced stages of one experiment (pretraining first) and what the traces assumed."""

    stages: list[StageTrace]
    assumptions: tuple[str, ...] = ASSUMPTIONS

    def pretrain(self) -> StageTrace:
        return self.stages[0]

    def to_json(self) -> dict[str, Any]:
        """`plan --json`'s "trace": pretraining's figures at the top, every stage below."""
        pre = self.pretrain()
        keys = ("world_size", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_peak_bytes", "peak_bytes")
        return {
            **{k: getattr(pre, k) for k in keys},
            "stages": [s.to_json() for s in self.stages],
            "assumptions": list(self.assumptions),
        }


class _Peaks:
    """What both trackers add to torch's: the whole-rank peak only (torch's version also walks every
    module's peak on every op, which costs more than the rest of a trace at 60 layers; per-module
    peaks are not reported), the highest activation total (activations + backward temporaries,
    which can peak at another moment than the total), and readings by category name."""

    _curr_mem_snap: dict[torch.device, dict[str, int]]
    _peak_mem: dict[torch.device, int]
    _peak_mem_snap: dict[torch.device, dict[str, int]]
    activation_peak = 0

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)
            held = snap.get("Activation", 0) + snap.get("Temp", 0)
            self.activation_peak = max(self.activation_peak, held)

    def current(self, kind: str) -> int:
        """Bytes held now in the tracker's category `kind` ("Sharded Param", "Gradient", ...)."""
        return sum(snap.get(kind, 0) for snap in self._curr_mem_snap.values())

    def peak(self) -> dict[str, int]:
        """The breakdown at the peak of the total, by the tracker's names (plus "Total")."""
        out: dict[str, int] = {}
        for snap in self._peak_mem_snap.values():
            for key, value in snap.items():
                name = str(key.value) if isinstance(key, Enum) else str(key)
                out[name] = out.get(name, 0) + int(value)
        return out


class _ShardedTracker(_Peaks, FSDPMemTracker):  # type: ignore[no-untyped-call]
    """FSDPMemTracker (sharded and gathered parameters, gradients, FSDP's buffers) for two optimizers:
    torch's takes one, and the trainer steps Muon and AdamW."""

    PARAMS, GRADS, OPT = "Sharded Param", "Sharded Grad", "OptState"

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        super().__init__(model)
        self._optimizers = optimizers
        self._handles: list[Any] = []

    def _instrument_optimizer(self) -> None:
        for opt in self._optimizers:
            self._track_optimizer_states(_FSDPRefType.OPT, opt)
            self._handles.append(opt.register_step_pre_hook(self._pre_step))
            self._handles.append(opt.register_step_post_hook(self._post_step))

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_opt = True

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._track_optimizer_states(_FSDPRefType.OPT, optimizer)
        self._in_opt = False

    def _deregister_module_and_optimizer_hooks(self) -> None:
        super()._deregister_module_and_optimizer_hooks()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _OneRankTracker(_Peaks, MemTracker):  # type: ignore[no-untyped-call]
    """MemTracker for a one-process job (nothing is sharded: FSDPMemTracker needs FSDP modules)."""

    PARAMS, GRADS, OPT = "Parameter", "Gradient", "Optstate"

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        super().__init__()
        self.track_external(model, *optimizers)


@contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """This process as rank 0 of a fake process group of `world_size` ranks (collectives move nothing)."""
    if dist.is_initialized():
        raise TrinityError("plan --trace needs a process without a torch.distributed process group")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def _own_head_scratch() -> Iterator[None]:
    """The fused head loss keeps its CPU scratch buffers between calls; fake ones must not outlive the trace."""
    saved = dict(head_loss._WORKSPACE)
    head_loss._WORKSPACE.clear()
    try:
        yield
    finally:
        head_loss._WORKSPACE.clear()
        head_loss._WORKSPACE.update(saved)


def layout_fields(spec: ExperimentSpec, seq_len: int, cp: int) -> dict[str, Any]:
    """The spec fields that decide a rank's memory, as `plan` names them."""
    par = spec.parallel
    return {
        "parallel.fsdp_group": par.fsdp_group,
        "parallel.ep": par.ep,
        "parallel.cp": cp,
        "parallel.micro_batch": par.micro_batch,
        "parallel.activation_checkpointing": par.activation_checkpointing,
        "parallel.param_dtype": par.param_dtype,
        "parallel.reduce_dtype": par.reduce_dtype,
        "stability.precision": spec.stability.precision,
        "seq_len": seq_len,
    }


def _shard(spec: ExperimentSpec, layout: Layout) -> tuple[TrinityModel, TrinityOptimizer]:
    """The model built on meta, sharded as training shards it, materialised (fake), and its optimizer."""
    # Outside fake mode: meshes compute with their real rank tables; meta tensors need no fake mode.
    with torch.device("meta"):
        model = TrinityModel(spec.model)
    if layout.world_size > 1:
        with warnings.catch_warnings():  # torch's notice about slicing the flattened "shard" dim, once per trace
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            parallelize(model, build_mesh(layout, DEVICE.type), layout, spec.parallel, spec.stability.precision)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=DEVICE)
        if layout.world_size > 1:
            # FSDP's lazy initialisation (at the first forward) moves every shard into its padded
            # buffer; done here, before the optimizer and the tracker see the parameters.
            assert isinstance(model, FSDPModule)
            model._get_fsdp_state()._lazy_init()
        optimizer = build_optimizer(model, spec.optim)
    return model, optimizer


def _step(spec: ExperimentSpec, model: TrinityModel, optimizer: TrinityOptimizer, layout: Layout, seq_len: int) -> None:
    """One micro-batch of the trainer's step (trinity.nodes.trainer.Training.train_step), on fake tensors."""
    stab, B, V = spec.stability, spec.parallel.micro_batch, spec.model.vocab_size
    tokens_BT = torch.randint(0, V, (B, seq_len), device=DEVICE)
    targets_BT = torch.randint(0, V, (B, seq_len), device=DEVICE)
    doc_ids_BT = torch.zeros(B, seq_len, dtype=torch.long, device=DEVICE) if stab.intra_document_masking else None
    positions = None
    if doc_ids_BT is not None and stab.reset_positions_per_document:
        positions = positions_from_doc_ids(doc_ids_BT)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=stab.precision == "bf16")
    with autocast:
        out = model(tokens_BT, doc_ids_BT=doc_ids_BT, labels_BT=targets_BT, position_ids_BT=positions)
    assert out.ce_loss is not None and out.z_loss_term is not None
    aux = combine_aux_loss(out.aux_loss_per_layer, stab.aux_loss_reduce)
    loss = out.ce_loss + stab.z_loss_weight * out.z_loss_term + stab.aux_loss_weight * aux
    loss.backward()
    rescale_expert_gradients(model, layout)


def trace_stage(spec: ExperimentSpec, stage: str, seq_len: int, cp: int) -> StageTrace:
    """One traced training step of `spec`'s model at `seq_len` under spec.parallel (see the module docstring)."""
    world = spec.parallel.total_ranks
    fields = layout_fields(spec, seq_len, cp)
    if cp != 1:
        return StageTrace(
            stage,
            seq_len,
            world,
            fields,
            skipped=f"cp = {cp}: context parallelism is not implemented in training, so there is no step to trace",
        )
    start = time.perf_counter()
    n_experts = spec.model.moe.n_experts if spec.model.n_moe_layers else None
    layout = layout_for(spec.parallel.model_copy(update={"cp": 1}), world, n_experts)
    with fake_world(world), balanced_routing(), _own_head_scratch():
        model, optimizer = _shard(spec, layout)
        with FakeTensorMode(allow_non_fake_inputs=True):
            # The optimizer state a run holds from its second step on, loaded as a resharding resume would.
            optimizer.load_state_dict(state_template(model, optimizer)["optimizer"])
            for state in optimizer.adamw.state.values() if optimizer.adamw is not None else ():
                # AdamW reads its step count as a number: a fake tensor made from a constant keeps it.
                state["step"] = torch.tensor(0.0)
            kind = _ShardedTracker if layout.world_size > 1 else _OneRankTracker
            tracker = kind(model, optimizer.optimizers)
            with tracker:
                _step(spec, model, optimizer, layout, seq_len)
                grads = tracker.current(tracker.GRADS)
                optimizer.step()
                params = tracker.current(tracker.PARAMS)
                opt_state = tracker.current(tracker.OPT)
                optimizer.zero_grad(set_to_none=True)
            peak = tracker.peak()
    return StageTrace(
        stage,
        seq_len,
        world,
        fields,
        param_bytes=params,
        grad_bytes=grads,
        optimizer_bytes=opt_state,
        activation_peak_bytes=tracker.activation_peak,
        peak_bytes=peak.get("Total", 0),
        peak_breakdown=peak,
        seconds=time.perf_counter() - start,
    )


def trace_plan(spec: ExperimentSpec, on_stage: Callable[[str], None] | None = None) -> TraceReport:
    """Pretraining at the longest phase's seq_len, then extension and SFT at theirs, when the spec has them.

    Stages are independent: with more than one to trace and more than one CPU, each is traced in
    its own process (a fake process group is one per process), as many at once as there are CPUs.
    `on_stage(text)` reports progress.
    """
    par = spec.parallel
    todo: list[tuple[str, int, int]] = [("pretrain", spec.data.max_seq_len, par.cp)]
    if (ext := spec.stages.extend) is not None:
        todo.append(("extend", ext.seq_len, ext.cp or par.cp))
    if (sft := spec.stages.sft) is not None:
        todo.append(("sft", sft.seq_len, par.cp))
    traced = [name for name, _, cp in todo if cp == 1]
    if on_stage is not None:
        on_stage(", ".join(traced))
    workers = min(len(traced), os.cpu_count() or 1)
    if workers <= 1 or dist.is_initialized():
        return TraceReport([trace_stage(spec, *stage) for stage in todo])
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_trace_stage_in_worker, spec, *stage) for stage in todo]
        return TraceReport([f.result() for f in futures])


def _trace_stage_in_worker(spec: ExperimentSpec, stage: str, seq_len: int, cp: int) -> StageTrace:
    """trace_stage in a pool process; a failure comes back as one picklable TrinityError naming the stage."""
    try:
        return trace_stage(spec, stage, seq_len, cp)
    except Exception as exc:  # what torch raises may not survive pickling back to the parent
        raise TrinityError(f"tracing the {stage} step failed: {type(exc).__name__}: {exc}") from None


def check_fits(report: TraceReport, spec: ExperimentSpec) -> None:
    """Raise a TrinityError naming every traced stage whose peak exceeds parallel.accelerator.memory_gib."""
    acc = spec.parallel.accelerator
    limit = acc.memory_gib * 1024**3
    over = [(s, s.peak_bytes) for s in report.stages if s.peak_bytes is not None and s.peak_bytes > limit]
    if not over:
        return
    lines = []
    for s, peak in over:
        fields = ", ".join(f"{k} = {v}" for k, v in s.layout.items())
        lines.append(
            f"{s.stage}: the traced step peaks at {peak:,} bytes ({peak / 1024**3:.1f} GiB) per rank, "
            f"over the {acc.name}'s {acc.memory_gib:g} GiB ({fields})"
        )
    raise TrinityError(
        "; ".join(lines) + ". Lower parallel.micro_batch, turn on parallel.activation_checkpointing, "
        "or shard wider (parallel.fsdp_group, parallel.ep)."
    )
