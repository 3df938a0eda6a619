"""The `execution` section: where and how nodes run. None of it ever enters a node's identity."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from trinity.spec.base import SpecModel, integral_to_int

# Upper bounds: far beyond any real cluster or run, low enough that a typo (an extra 000) is caught.
Minutes = Annotated[int, Field(gt=0, le=525_600)]  # one year
Steps = Annotated[int, Field(gt=0, le=1_000_000_000)]
Count = Annotated[int, Field(ge=0, le=100_000)]
CPUs = Annotated[int, Field(gt=0, le=4096)]


class SlurmSpec(SpecModel):
    """Slurm resources and behaviour (used with `executor: slurm`)."""

    partition: str | None = None
    """Partition to submit to (None: the cluster's default). Resources are fitted to it (`sinfo`)."""
    account: str | None = None
    """Account to charge."""
    qos: str | None = None
    """Quality of service."""
    time_min: dict[str, Minutes] = Field(default_factory=dict)
    """Time limit in minutes by node kind ('tokenizer', 'prepare', 'pretrain', ...); 'default' for the rest.
    A kind named nowhere gets 1 day, or the partition's MaxTime if shorter; a value given here beyond the
    partition's MaxTime is refused before submitting."""
    signal_delay_s: int = Field(120, gt=0, le=86_400)
    """Seconds before the time limit at which the job is signalled to checkpoint and requeue."""
    max_requeues: Count = 20
    """Timeouts/preemptions a node may be requeued for before it is marked failed."""
    array_parallelism: int = Field(64, gt=0, le=100_000)
    """At most this many tasks of a sweep's job array run at once."""
    cpus_per_task: CPUs | None = None
    """CPUs per task (None: what the node kind can use, capped by the CPUs per node the partition offers,
    shared by the job's tasks). A value the partition cannot hold is refused before submitting."""
    mem_gb: Annotated[int, Field(gt=0, le=1_048_576)] | None = None
    """Memory per node in GB (None: the cluster's default); refused before submitting if no node has it."""
    extra_sbatch: dict[str, str] = Field(default_factory=dict)
    """Extra sbatch options, name -> value (e.g. {'constraint': 'h200'}), passed as given and not checked;
    a job they make impossible fails its node with Slurm's pending reason."""


class LocalSpec(SpecModel):
    """The local executor (each node in its own subprocess).

    A training node runs as `parallel.gpus_per_node` processes through torchrun (the `parallel`
    section is the one source of the layout; the local executor needs `parallel.nodes` = 1)."""

    threads: CPUs | None = None
    """torch threads per process (None: torch's default for one process; CPU cores / ranks under torchrun)."""


class CheckpointSpec(SpecModel):
    """When training nodes commit checkpoints, which ones they keep, and how they write them.

    Written `execution.checkpoint: {every, keep_last, keep_every, async, compression}`. The older spelling
    `execution.checkpoint_every` / `execution.keep_last` (in the spec.yaml of earlier run directories)
    still reads as `every` / `keep_last`; giving a setting under both names is an error."""

    model_config = ConfigDict(populate_by_name=True)

    every: Steps = 1000
    """Commit a checkpoint every this many optimizer steps (and at the last step, and on a stop request)."""
    keep_last: int = Field(2, gt=0, le=10_000)
    """The newest this many committed checkpoints of a node are kept (the newest committed one always)."""
    keep_every: Steps | None = None
    """Also keep, forever, every checkpoint whose step is a multiple of this (None: only the last ones)."""
    async_: bool | None = Field(None, alias="async")
    """Write checkpoints in a background thread while training continues (written `async` in YAML): the
    state is copied to host memory at the step boundary, at most one save is in flight. None: asynchronous
    when training on a GPU, synchronous on CPU (where the copy and the writer compete with training for
    the same cores); true/false force it."""
    compression: Literal["none", "zstd", "lz4"] = "none"
    """Compression of the checkpoint's arrays (none: the fastest to write and read)."""


class PrepareSpec(SpecModel):
    """How a phase's prepare node tokenizes: in shards of pieces, by worker processes or a Slurm job array.

    The documents a phase needs are cut into pieces of about `piece_mb` (by file and byte range; a compressed
    file or a Parquet row group is never cut), the pieces are dealt to `shards` shards in order, and each
    piece is committed as its own store the moment it is tokenized, so a killed prepare resumes at the first
    piece not committed. None of it changes the token stream (the same documents in the same order)."""

    shards: int = Field(8, gt=0, le=100_000)
    """Shards a phase's pieces are dealt to: a Slurm job array of this many tasks (at most
    `execution.slurm.array_parallelism` at once); locally, `workers` processes take them in turn."""
    workers: CPUs | None = None
    """Local worker processes tokenizing shards at once (None: the machine's CPU cores, at most `shards`);
    each gets an equal share of the cores for the tokenizer's threads."""
    piece_mb: int = Field(256, gt=0, le=1_048_576)
    """Text per piece, in MB (the unit of work and of resume)."""


Seconds = Annotated[float, Field(gt=0, le=30 * 86_400.0)]  # a month
ALLOW_INJECT_ENV = "TRINITY_ALLOW_INJECT"
"""`execution.inject` is refused unless this environment variable is 1 (fault injection is for tests)."""


class WatchdogSpec(SpecModel):
    """When a training node counts as stalled (its optimizer steps stopped advancing) and what then happens.

    The allowance is `first_step_s` until the attempt's first optimizer step completes (its warm-up), then
    `stall_after_s` when given, else max(`min_stall_s`, `stall_factor` x the median step time of the attempt
    so far). It runs from the last completed step, so it must also cover a checkpoint save. A stall is seen
    from outside the node (the local scheduler, or the Slurm job's supervisor), since a hung process cannot
    be trusted to act: it is an `events` row of kind `stall`, `trinity status` shows the node RUNNING
    (STALLED: why), and with `on_stall: restart` the attempt is killed and a new one resumes from the last
    committed checkpoint (on Slurm: the job is requeued)."""

    stall_after_s: Seconds | None = None
    """Seconds without a completed step, after the first, after which the node is stalled (None: from the
    measured step time)."""
    min_stall_s: Seconds = 60.0
    """The least allowance derived from the step time (when `stall_after_s` is None)."""
    stall_factor: float = Field(10.0, ge=1.0, le=10_000.0)
    """The allowance as a multiple of the median step time (when `stall_after_s` is None)."""
    first_step_s: Seconds = 1800.0
    """The allowance from the start of the attempt's steps until its first step completes (its warm-up)."""
    on_stall: Literal["warn", "restart"] = "restart"
    """warn: an event and the status only; restart: also kill the attempt and start one that resumes."""
    max_restarts: Count = 3
    """Stall restarts of a node per scheduler run (per Slurm job: requeues); beyond that the node fails."""


class InjectSpec(SpecModel):
    """Faults injected on purpose, for tests of the watchdog and of loss-spike handling. Refused unless the
    environment has TRINITY_ALLOW_INJECT=1, so that no real run carries one by mistake."""

    spike_at_step: Steps | None = None
    """Multiply the loss of this optimizer step by `spike_factor` (None: no spike)."""
    spike_factor: float = Field(100.0, gt=0, le=1e12)
    """How much larger the injected spike's loss is."""
    hang_at_step: Steps | None = None
    """In the node's attempt 1 only, rank `hang_rank` sleeps `hang_s` right before this optimizer step."""
    hang_rank: Count = 0
    """The rank that hangs."""
    hang_s: Seconds = 3600.0
    """How long it sleeps."""

    @model_validator(mode="after")
    def _allowed(self) -> InjectSpec:
        if os.environ.get(ALLOW_INJECT_ENV) != "1":
            raise ValueError(
                f"execution.inject injects faults and is for tests only; set {ALLOW_INJECT_ENV}=1 in the "
                "environment to allow it, or remove execution.inject from the spec"
            )
        return self


# The older spelling of `execution.checkpoint`'s fields, still read (see CheckpointSpec).
_RENAMED = {"checkpoint_every": "every", "keep_last": "keep_last"}


class ExecutionSpec(SpecModel):
    """Executor, cadences and paths. Changing any of it re-runs nothing."""

    executor: Literal["local", "slurm"] = "local"
    """Run nodes as local subprocesses or as Slurm jobs through submitit."""
    run_root: str = "runs"
    """Where run directories are created (relative to the working directory)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint cadence, retention, asynchronous writing and compression."""
    prepare: PrepareSpec = PrepareSpec()
    """Shards, worker processes and piece size of the prepare nodes (trinity.nodes.prepare)."""
    store: str | None = Field(None, min_length=1, max_length=4096)
    """A directory shared by runs that holds node outputs addressed by node identity (None: no sharing).
    A node whose identity already has a committed output there reuses it (linked, nothing copied)
    instead of running; a node that runs publishes its output there. Relative to the working directory."""
    log_every: Steps = 1
    """Write telemetry every this many steps."""
    expert_load_every: Steps = 10
    """Write per-expert load rows every this many steps (MaxVio and bias statistics are written every step)."""
    heartbeat_s: int = Field(30, gt=0, le=3600)
    """Heartbeat lease period; a lease older than 3 periods means the node died."""
    activations: tuple[str, ...] = Field((), max_length=1000)
    """Layers whose activations and router scores are captured, e.g. ('layers.3',)."""
    activation_steps: tuple[Annotated[int, Field(ge=0, le=1_000_000_000)], ...] = Field((), max_length=10_000)
    """Steps at which activations are captured."""
    slurm: SlurmSpec = SlurmSpec()
    """Slurm settings."""
    local: LocalSpec = LocalSpec()
    """Local executor settings."""
    watchdog: WatchdogSpec = WatchdogSpec()
    """Stall detection of training nodes (steps that stop advancing) and what to do about it."""
    inject: InjectSpec | None = None
    """Fault injection for tests (loss spike, hung rank); refused unless TRINITY_ALLOW_INJECT=1."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_checkpoint_fields(cls, data: Any) -> Any:
        """`checkpoint_every` / `keep_last` of older specs -> `checkpoint.every` / `checkpoint.keep_last`."""
        if not isinstance(data, dict) or not any(old in data for old in _RENAMED):
            return data
        data = dict(data)
        section = data.get("checkpoint", {})
        section = dict(section) if isinstance(section, dict) else section
        for old, new in _RENAMED.items():
            if old not in data:
                continue
            value = data.pop(old)
            if isinstance(section, dict) and new in section:
                raise ValueError(
                    f"execution.{old} and execution.checkpoint.{new} are both given; "
                    f"{old} is the older name of checkpoint.{new}: keep only checkpoint.{new}"
                )
            annotation = CheckpointSpec.model_fields[new].annotation
            metadata = CheckpointSpec.model_fields[new].metadata
            try:
                TypeAdapter(Annotated[annotation, *metadata]).validate_python(integral_to_int(value), strict=True)
            except ValidationError as exc:
                reason = exc.errors()[0]["msg"]
                raise ValueError(
                    f"execution.{old} = {value!r} (the older name of checkpoint.{new}): {reason}"
                ) from None
            if isinstance(section, dict):
                section[new] = value
        data["checkpoint"] = section
        return data
