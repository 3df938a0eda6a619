"""What a Slurm partition offers (`sinfo`), and the resources of a node's job fitted to it.

A node's job asks for what its kind can use (`WANTED_CPUS`; a training node: one task per rank,
`parallel.gpus_per_node` tasks on each of `parallel.nodes` nodes) and, where the spec leaves a value
unset, is capped by the partition it goes to (the spec's `execution.slurm.partition`, else the
cluster's default one): CPUs per node shared by the job's tasks, the partition's time limit. A
value the user set (`execution.slurm.cpus_per_task`, `mem_gb`, `time_min`, the `parallel` layout)
that the partition cannot hold is refused before anything is submitted, naming the field and what
the partition offers; Slurm would otherwise keep the job pending forever (reason PartitionConfig).
`execution.slurm.extra_sbatch` is passed to sbatch as given and not checked here: a job it makes
impossible is caught by the watcher (`slurm_queue.never_starts`).

`Cluster` runs `sinfo` once (with a timeout) and keeps every partition, so one run asks once.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

from trinity.errors import SpecError
from trinity.graph.kinds import DISTRIBUTED_KINDS, TRAINING_KINDS
from trinity.spec.experiment import ExperimentSpec

SINFO_TIMEOUT_S = 30.0
SINFO_FORMAT = "%P|%N|%c|%m|%G|%B|%l|%s"
"""Partition (default marked '*'), node, CPUs, memory (MB), gres, MaxCPUsPerNode, time limit, job size."""

WANTED_CPUS = {"tokenizer": 8, "prepare": 16, "eval": 8}
"""CPUs per task a node of this kind can use when the spec names none (BPE training and tokenizing run on
Rust threads; an eval runs torch in one process). A training task (one rank) wants 8 CPUs with a GPU and
1 on CPU-only layouts, where ranks share the node's cores. Capped by the partition's CPUs per node."""
DEFAULT_TIME_MIN = 60 * 24
"""Time limit when `execution.slurm.time_min` names none for the kind (capped by the partition's MaxTime)."""


@dataclass(frozen=True)
class Partition:
    """The largest job one partition can run, per node and in all."""

    name: str
    cpus_per_node: int
    """Most CPUs on one node, within the partition's MaxCPUsPerNode."""
    mem_mb: int
    """Most memory on one node (MB)."""
    gpus_per_node: int
    """Most GPUs (gres `gpu`) on one node."""
    nodes: int
    """Nodes in the partition, within its largest job size."""
    max_time_min: int | None
    """The partition's time limit in minutes (None: unlimited)."""

    def describe(self) -> str:
        gpus = f", {self.gpus_per_node} GPUs" if self.gpus_per_node else ", no GPUs"
        limit = "no time limit" if self.max_time_min is None else f"a time limit of {self.max_time_min} min"
        return (
            f"partition {self.name!r} offers {self.cpus_per_node} CPUs, {self.mem_mb} MB{gpus} per node, "
            f"{self.nodes} node(s), {limit}"
        )


def parse_minutes(text: str) -> int | None:
    """A Slurm time limit in minutes: 'infinite', 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS'."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = [*parts, 0, 0][:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, (minutes, seconds) = 0, parts
    else:
        hours, minutes, seconds = 0, parts[0], 0
    total = (int(days or 0) * 24 + hours) * 60 + minutes
    return total + (1 if seconds else 0)


def parse_gpus(gres: str) -> int:
    """GPUs in a node's gres, e.g. 'gpu:h200:8(S:0-1)' -> 8, 'gpu:2,gpu:a100:2' -> 4, '(null)' -> 0."""
    return sum(int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[A-Za-z][\w.-]*)?:(\d+)", gres))


def _number(text: str) -> int | None:
    match = re.match(r"\d+", text.strip())
    return int(match.group()) if match else None


def parse_sinfo(out: str) -> tuple[dict[str, Partition], str | None]:
    """Partitions from `sinfo -h -N -o SINFO_FORMAT` (one line per node and partition), and the default's name."""
    rows: dict[str, list[list[str]]] = {}
    default = None
    for line in out.splitlines():
        cols = line.split("|")
        if len(cols) != 8:
            continue
        name = cols[0].rstrip("*")
        if cols[0].endswith("*"):
            default = name
        rows.setdefault(name, []).append(cols)
    partitions = {}
    for name, lines in rows.items():
        cpus = max(_number(c[2]) or 0 for c in lines)
        if (cap := _number(lines[0][5])) is not None:  # MaxCPUsPerNode ('UNLIMITED' otherwise)
            cpus = min(cpus, cap)
        nodes = len({c[1] for c in lines})
        size = lines[0][7].split("-")[-1]  # job size 'MIN-MAX'
        if (largest := _number(size)) is not None:
            nodes = min(nodes, largest)
        partitions[name] = Partition(
            name=name,
            cpus_per_node=cpus,
            mem_mb=max(_number(c[3]) or 0 for c in lines),
            gpus_per_node=max(parse_gpus(c[4]) for c in lines),
            nodes=nodes,
            max_time_min=parse_minutes(lines[0][6]),
        )
    return partitions, default


@dataclass
class Cluster:
    """The cluster's partitions, read from `sinfo` once; `problem` says why they could not be read."""

    partitions: dict[str, Partition] = field(default_factory=dict)
    default: str | None = None
    problem: str | None = None

    @classmethod
    def query(cls, timeout_s: float = SINFO_TIMEOUT_S) -> Cluster:
        try:
            done = subprocess.run(
                ["sinfo", "-h", "-N", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=timeout_s
            )
        except FileNotFoundError:
            return cls(problem="sinfo is not on PATH")
        except subprocess.TimeoutExpired:
            return cls(problem=f"sinfo did not answer within {timeout_s:.0f} s")
        except OSError as err:
            return cls(problem=f"sinfo could not run: {err}")
        if done.returncode != 0:
            return cls(problem=f"sinfo failed: {done.stderr.strip()[:300]}")
        partitions, default = parse_sinfo(done.stdout)
        return cls(partitions, default, None if partitions else "sinfo listed no partition")

    def partition(self, spec: ExperimentSpec, strict: bool = True) -> Partition | None:
        """The partition a node of `spec` is submitted to (None: unknown, nothing is capped or checked).

        A partition the spec names that the cluster lacks is refused when `strict` (a run), else unknown (a
        dry run of a graph written for another cluster shows its values as written)."""
        name = spec.execution.slurm.partition
        if self.problem is not None:
            return None
        if name is None:
            return self.partitions.get(self.default) if self.default else None
        if name not in self.partitions:
            if not strict:
                return None
            raise SpecError(
                [
                    f"execution.slurm.partition = {name!r}: the cluster has no such partition "
                    f"(sinfo lists: {', '.join(sorted(self.partitions))})"
                ]
            )
        return self.partitions[name]


def fit_resources(kind: str, spec: ExperimentSpec, partition: Partition | None) -> dict[str, Any]:
    """nodes, ntasks_per_node, cpus_per_task, gpus_per_node (if any) and time of a node's job, fitted to
    `partition` (unchecked when None); raises SpecError naming the field a user set beyond it."""
    slurm, par = spec.execution.slurm, spec.parallel
    on_gpus = par.accelerator.name.lower() != "cpu"
    if kind in DISTRIBUTED_KINDS and par.total_ranks > 1:
        nodes, tasks, gpus = par.nodes, par.gpus_per_node, par.gpus_per_node if on_gpus else 0
    else:
        nodes, tasks = 1, 1
        gpus = 1 if on_gpus and (kind in TRAINING_KINDS or kind == "eval") else 0
    wanted = (8 if on_gpus else 1) if kind in TRAINING_KINDS else WANTED_CPUS.get(kind, 4)
    key = kind if kind in slurm.time_min else "default"
    minutes = slurm.time_min.get(key, DEFAULT_TIME_MIN)
    cpus = slurm.cpus_per_task or wanted
    if partition is not None:
        problems = []
        offers = partition.describe()
        if nodes > partition.nodes:
            problems.append(f"parallel.nodes = {nodes}: node kind {kind!r} needs {nodes} nodes; {offers}")
        if tasks > partition.cpus_per_node:
            problems.append(
                f"parallel.gpus_per_node = {tasks}: node kind {kind!r} runs {tasks} tasks (one per rank, at least "
                f"1 CPU each) on one node; {offers}"
            )
        if gpus > partition.gpus_per_node:
            field_name = "parallel.gpus_per_node" if tasks > 1 else "parallel.accelerator.name"
            value = tasks if tasks > 1 else par.accelerator.name
            problems.append(f"{field_name} = {value}: node kind {kind!r} needs {gpus} GPU(s) per node; {offers}")
        if slurm.cpus_per_task is not None and slurm.cpus_per_task * tasks > partition.cpus_per_node:
            problems.append(
                f"execution.slurm.cpus_per_task = {slurm.cpus_per_task}: node kind {kind!r} needs "
                f"{tasks} task(s) x {slurm.cpus_per_task} CPUs on one node; {offers}"
            )
        if slurm.mem_gb is not None and slurm.mem_gb * 1024 > partition.mem_mb:
            problems.append(f"execution.slurm.mem_gb = {slurm.mem_gb} ({slurm.mem_gb * 1024} MB); {offers}")
        limit = partition.max_time_min
        if limit is not None and minutes > limit:
            if key in slurm.time_min:
                problems.append(f"execution.slurm.time_min.{key} = {minutes}; {offers}")
            minutes = limit
        if problems:
            raise SpecError(sorted(set(problems)))
        if slurm.cpus_per_task is None:
            cpus = max(1, min(wanted, partition.cpus_per_node // tasks))
    fitted: dict[str, Any] = {"nodes": nodes, "ntasks_per_node": tasks, "cpus_per_task": cpus, "time": minutes}
    if gpus:
        fitted["gpus_per_node"] = gpus
    return fitted
