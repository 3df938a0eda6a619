"""Where this process sits in a torch.distributed job, and joining it.

The rendezvous comes from the launcher's environment:
- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
- a Slurm job step (one task per rank, `srun`) sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and
  the tasks per node; the master is the first host of SLURM_JOB_NODELIST and the port is derived
  from the job id, so every task of the job computes the same address without talking to the others;
- neither: a single process (rank 0 of 1).

torch is imported only by `init_distributed` and `destroy_distributed`, so the launchers (which
run without a model) can read the environment cheaply.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

PORT_BASE = 20000
"""Slurm jobs rendezvous on PORT_BASE + job id mod PORT_SPAN: stable across requeues of one job."""
PORT_SPAN = 20000
SINGLE_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def torchrun_variables(self) -> dict[str, str]:
        """The variables torchrun would set for this rank (what `init_process_group('env://')` reads)."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the rendezvous from torchrun's variables, else Slurm's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", SINGLE_PORT)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=_slurm_tasks_on_this_node(env),
            master_addr=first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"),
            master_port=slurm_port(env["SLURM_JOB_ID"]),
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", SINGLE_PORT)


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job: the same for every task and every requeue of the job."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
    """Tasks on this node: SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_TASKS_PER_NODE ('2(x3),1')."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return int(env["SLURM_NTASKS"])
    counts = expand_tasks_per_node(spec)
    return counts[min(int(env.get("SLURM_NODEID", "0")), len(counts) - 1)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed tasks-per-node list, one entry per node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot read Slurm tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ('gpu[003-005,9],cpu1' -> 'gpu003'), by `scontrol show hostnames`."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return first_host_of(nodelist)


def first_host_of(nodelist: str) -> str:
    """The first host of a node list, read without Slurm (what `scontrol show hostnames` prints first)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def init_distributed() -> DistEnv:
    """Join the job's process group (gloo on CPU, NCCL with CUDA; env:// rendezvous) when there is more
    than one rank. Idempotent; sets the CUDA device from the local rank on GPUs."""
    env = dist_env()
    if env.world_size == 1:
        return env
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return env
    for name, value in env.torchrun_variables().items():
        os.environ.setdefault(name, value)  # env:// reads them; Slurm-launched processes lack them
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
        raise RuntimeError(
            f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"the environment says {env.rank} of {env.world_size}"
        )
    return env


def destroy_distributed() -> None:
    """Leave the process group if this process joined one."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_primary() -> bool:
    """Rank 0 (or a single process): the one that writes the node's files."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    return dist_env().rank == 0
