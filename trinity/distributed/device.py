"""The device a training process computes on, and what a step did with it.

CUDA when torch sees a GPU: the process's local rank (torchrun's LOCAL_RANK, Slurm's SLURM_LOCALID)
picks the GPU of its node. The CPU otherwise. Every training, evaluation and generation node asks
here instead of naming a device, so the same code runs on a laptop, one GPU and a cluster:
`autocast` is bf16 autocast on the device's own type, `to_device` moves a batch after the model
(pinned host memory and non-blocking copies on CUDA, nothing on the CPU).

Per-step telemetry also comes from here: `peak_memory` (what the step held at its peak, after
`reset_peak_memory` at its start) and `model_flops_utilization` (achieved FLOP/s over the
accelerator's declared peak).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from trinity.distributed.env import dist_env

T = TypeVar("T")

_PROC = Path("/proc/self")


HOST = torch.device("cpu")
"""The host: the CPU fallback of training and of gloo's collectives, the fake device of `plan --trace`."""


def training_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU (the only CPU fallback of the trainer)."""
    if torch.cuda.is_available():
        local = dist_env().local_rank
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local} has no GPU: this node shows {torch.cuda.device_count()}; "
                "start at most one rank per GPU (parallel.gpus_per_node)"
            )
        return torch.device("cuda", local)
    return HOST


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: this rank's GPU under NCCL, else the
    host (gloo; also without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return training_device()
    return HOST


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (a sharded parameter's local shard device): where its inputs go.

    A module without parameters or buffers (or a stand-in model that is no nn.Module) runs where
    this process trains: `training_device()`.
    """
    for t in itertools.chain(getattr(module, "parameters", tuple)(), getattr(module, "buffers", tuple)()):
        return cast(torch.Tensor, t).device
    return training_device()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `device`'s type for precision "bf16"; no autocast (full fp32) otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: T, device: torch.device) -> T:
    """`batch` with every tensor on `device`: a tensor, or a dataclass, dict, list or tuple holding some.

    On CUDA a host tensor is pinned and copied without blocking, so the copy overlaps the work
    already queued (the stream orders it before any kernel that reads it). On the same device
    (the CPU run) tensors are returned as they are: no copy.
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        if device.type == "cuda" and batch.is_cpu:
            return batch.pin_memory().to(device, non_blocking=True)  # type: ignore[return-value]
        return batch.to(device)  # type: ignore[return-value]
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, dict):
        return type(batch)((k, to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, list | tuple) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs kernels asynchronously): a step's wall time ends here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class PeakMemory:
    """Peak memory since the last `reset_peak_memory`, bytes.

    CUDA: allocated = torch.cuda.max_memory_allocated (tensors), reserved =
    torch.cuda.max_memory_reserved (what the caching allocator held from the driver, >= allocated).
    CPU: allocated = the process's peak resident set size (VmHWM; it counts everything the process
    holds, not only tensors), reserved = None (the CPU has no caching allocator to report).
    """

    allocated: int
    reserved: int | None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak RSS
    (writing 5 to /proc/self/clear_refs resets VmHWM). Where the RSS peak cannot be reset (not
    Linux, or a kernel that refuses), `peak_memory` reports the peak since the process started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        (_PROC / "clear_refs").write_text("5")


def peak_memory(device: torch.device) -> PeakMemory:
    """Peak memory on `device` since `reset_peak_memory` (see PeakMemory for what each number counts)."""
    if device.type == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
    return PeakMemory(_peak_rss_bytes(), None)


def _peak_rss_bytes() -> int:
    """VmHWM of /proc/self/status (resettable), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    with contextlib.suppress(OSError):
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def model_flops_utilization(
    tokens_per_s: float, flops_per_token: float, ranks: int, peak_tflops_per_rank: float
) -> float:
    """MFU = achieved FLOP/s per rank / the accelerator's declared peak.

    tokens_per_s: tokens of the whole job per second; flops_per_token: training (forward +
    backward) FLOPs of one token (trinity.graph.estimates.flops_per_token, the plan's own count);
    ranks: processes sharing those tokens; peak_tflops_per_rank: parallel.accelerator.peak_bf16_tflops.
    """
    return tokens_per_s * flops_per_token / ranks / (peak_tflops_per_rank * 1e12)
