"""The `execution` section: where and how nodes run. None of it ever enters a node's identity."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from trinity.spec.base import SpecModel


class SlurmSpec(SpecModel):
    """Slurm resources and behaviour (used with `executor: slurm`)."""

    partition: str | None = None
    """Partition to submit to (None: the cluster's default)."""
    account: str | None = None
    """Account to charge."""
    qos: str | None = None
    """Quality of service."""
    time_min: dict[str, PositiveInt] = Field(default_factory=lambda: {"default": 60 * 24})
    """Time limit in minutes by node kind ('tokenizer', 'prepare', 'pretrain', ...); 'default' for the rest."""
    signal_delay_s: PositiveInt = 120
    """Seconds before the time limit at which the job is signalled to checkpoint and requeue."""
    max_requeues: NonNegativeInt = 20
    """Timeouts/preemptions a node may be requeued for before it is marked failed."""
    array_parallelism: PositiveInt = 64
    """At most this many tasks of a sweep's job array run at once."""
    cpus_per_task: PositiveInt | None = None
    """CPUs per task (None: a default by node kind)."""
    mem_gb: PositiveInt | None = None
    """Memory per node in GB (None: the cluster's default)."""
    extra_sbatch: dict[str, str] = Field(default_factory=dict)
    """Extra sbatch options, name -> value (e.g. {'constraint': 'h200'})."""


class LocalSpec(SpecModel):
    """The local executor (each node in its own subprocess).

    A training node runs as `parallel.gpus_per_node` processes through torchrun (the `parallel`
    section is the one source of the layout; the local executor needs `parallel.nodes` = 1)."""

    threads: PositiveInt | None = None
    """torch threads per process (None: torch's default for one process; CPU cores / ranks under torchrun)."""


class ExecutionSpec(SpecModel):
    """Executor, cadences and paths. Changing any of it re-runs nothing."""

    executor: Literal["local", "slurm"] = "local"
    """Run nodes as local subprocesses or as Slurm jobs through submitit."""
    run_root: str = "runs"
    """Where run directories are created (relative to the working directory)."""
    checkpoint_every: PositiveInt = 1000
    """Commit a checkpoint every this many optimizer steps (and at the end)."""
    keep_last: PositiveInt = 2
    """Committed checkpoints kept per node (the last committed one is never deleted)."""
    log_every: PositiveInt = 1
    """Write telemetry every this many steps."""
    expert_load_every: PositiveInt = 10
    """Write per-expert load rows every this many steps (MaxVio and bias statistics are written every step)."""
    heartbeat_s: PositiveInt = 30
    """Heartbeat lease period; a lease older than 3 periods means the node died."""
    activations: tuple[str, ...] = ()
    """Layers whose activations and router scores are captured, e.g. ('layers.3',)."""
    activation_steps: tuple[NonNegativeInt, ...] = ()
    """Steps at which activations are captured."""
    slurm: SlurmSpec = SlurmSpec()
    """Slurm settings."""
    local: LocalSpec = LocalSpec()
    """Local executor settings."""
