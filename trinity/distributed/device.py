"""The device a training process computes on.

CUDA when torch sees a GPU: the process's local rank (torchrun's LOCAL_RANK, Slurm's SLURM_LOCALID)
picks the GPU of its node. The CPU otherwise. Every training and evaluation node asks here instead
of naming a device, so the same code runs on a laptop, one GPU and a cluster.
"""

from __future__ import annotations

import torch

from trinity.distributed.env import dist_env


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
    return torch.device("cpu")
