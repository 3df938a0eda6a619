"""Peak memory and time of one training step under each activation-checkpointing policy (prints JSON).

The tiny recipe's model (specs/model/tiny.yaml: d_model 128, 6 layers, 8 experts top-2) at a
longer sequence than it trains on, one forward + backward (no optimizer) of the same weights on
the same batch, side by side in one process for parallel.activation_checkpointing = none, full,
selective (selective_save = moe: attention recomputed) and selective (selective_save = attention:
the MoE / FFN recomputed).

Peak memory: torch's own tracker, `torch.distributed._tools.mem_tracker.MemTracker` (a
TorchDispatchMode that follows every tensor storage as it is created and freed, by kind:
parameters, gradients, activations, temporaries), which works on CPU, where there is no
allocator to ask. It counts tensor bytes only (no allocator slack, no interpreter). Reported:
the step's peak total, and the peak minus parameters and gradients (what checkpointing acts on),
each with its ratio to `none`. Step time is timed outside the tracker (it slows every op):
policies alternate `--iters` times after a warm-up, best and median per policy, and the ratio of
the best to the best of `none`.

    python bench/activation_checkpointing.py [--seq 4096] [--batch 1] [--iters 5] [--precision fp32]
        [--out bench/activation_checkpointing.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed._tools.mem_tracker import MemTracker

from trinity.model import TrinityModel
from trinity.model.checkpointing import apply_activation_checkpointing
from trinity.spec.model import ModelSpec
from trinity.spec.parallel import ParallelSpec

ROOT = Path(__file__).resolve().parents[1]
POLICIES: dict[str, dict[str, str]] = {
    "none": {"activation_checkpointing": "none"},
    "full": {"activation_checkpointing": "full"},
    "selective_save_moe": {"activation_checkpointing": "selective", "selective_save": "moe"},
    "selective_save_attention": {"activation_checkpointing": "selective", "selective_save": "attention"},
}


def tiny_spec() -> ModelSpec:
    return ModelSpec.model_validate(yaml.safe_load((ROOT / "specs/model/tiny.yaml").read_text()))


def precision_context(precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast, as trinity's trainer uses for stability.precision: bf16, or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def step(model: TrinityModel, ids_BT: torch.Tensor, precision: str) -> None:
    """One forward + backward of the training loss (CE + aux + z terms, as the trainer sums them)."""
    model.zero_grad(set_to_none=True)
    with precision_context(precision):
        out = model(ids_BT[:, :-1], labels_BT=ids_BT[:, 1:])
    assert out.ce_loss is not None and out.z_loss_term is not None
    (out.ce_loss + 1e-4 * out.z_loss_term + 1e-3 * out.aux_loss_per_layer.sum()).backward()


def peak_bytes(model: TrinityModel, ids_BT: torch.Tensor, precision: str) -> dict[str, int]:
    """MemTracker's peak snapshot of one step on the CPU: total and by kind (bytes)."""
    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step(model, ids_BT, precision)
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {getattr(kind, "value", str(kind)): int(n) for kind, n in snapshot.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    spec = tiny_spec()
    torch.manual_seed(0)
    base = TrinityModel(spec).train()
    ids_BT = torch.randint(0, spec.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    models = {}
    for name, fields in POLICIES.items():
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, ParallelSpec.model_validate(fields))
        models[name] = model

    memory = {name: peak_bytes(model, ids_BT, args.precision) for name, model in models.items()}
    for model in models.values():  # warm-up
        step(model, ids_BT, args.precision)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.iters):
        for name, model in models.items():
            t0 = time.perf_counter()
            step(model, ids_BT, args.precision)
            times[name].append(time.perf_counter() - t0)

    def without_weights(m: dict[str, int]) -> int:
        return m["Total"] - m.get("Parameter", 0) - m.get("Gradient", 0)

    none_total, none_act, none_time = memory["none"]["Total"], without_weights(memory["none"]), min(times["none"])
    rows = []
    for name in models:
        rows.append(
            {
                "policy": name,
                "peak_mib": memory[name]["Total"] / 2**20,
                "peak_ratio_to_none": memory[name]["Total"] / none_total,
                "peak_minus_params_grads_mib": without_weights(memory[name]) / 2**20,
                "peak_minus_params_grads_ratio_to_none": without_weights(memory[name]) / none_act,
                "peak_by_kind_mib": {k: v / 2**20 for k, v in memory[name].items()},
                "step_s_best": min(times[name]),
                "step_s_median": statistics.median(times[name]),
                "step_time_ratio_to_none": min(times[name]) / none_time,
                "step_s": sorted(times[name]),
            }
        )
    result = {
        "model": "specs/model/tiny.yaml",
        "params": sum(p.numel() for p in base.parameters()),
        "batch": [args.batch, args.seq],
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "memory_tracker": "torch.distributed._tools.mem_tracker.MemTracker (tensor storages, CPU)",
        "torch": torch.__version__,
        "policies": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
