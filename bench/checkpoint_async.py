"""Step-time overhead of checkpointing: none vs synchronous vs asynchronous (prints JSON).

A TrinityModel (the tiny spec and bench/checkpoint.py's ~50M-parameter "medium" one) trains with
AdamW on random tokens for `--steps` steps, three times side by side in one process: without
checkpoints, with a synchronous checkpoint every `--every` steps (trinity.store.checkpoint.save_checkpoint,
keep_last=2, fsync on, as a node does) and with an asynchronous one (trinity.store.checkpoint_async:
host copy at the step boundary, a worker thread writes). Reported per model: seconds per step of each
mode (median over `--repeats` rounds, the modes interleaved within a round), the overhead ratios
`sync_vs_none` and `async_vs_none` (step time with checkpoints / without; 1.0 = free), and for the
asynchronous mode the seconds a checkpointing step was blocked (host copy + waiting for the previous
save).

On a CPU-only machine the worker thread competes with training for the same cores (writing and
hashing the arrays is CPU work), so asynchronous saving hides much less than on a GPU, where training
runs on the device and the host's cores are idle; `None` (the default of execution.checkpoint.async)
is therefore synchronous on the CPU. The JSON records the cores and the load average at the start.

    python bench/checkpoint_async.py [--steps 20] [--every 5] [--repeats 2] [--out bench/checkpoint_async.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from checkpoint import MEDIUM  # bench/checkpoint.py's medium model (a sibling script: bench/ is sys.path[0])

from trinity.model import TrinityModel
from trinity.spec.model import ModelSpec
from trinity.store.checkpoint import save_checkpoint
from trinity.store.checkpoint_async import AsyncCheckpointer

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"tiny": (8, 256), "medium": (2, 256)}  # (sequences, tokens) per step


def spec_of(name: str) -> ModelSpec:
    if name == "tiny":
        return ModelSpec.model_validate(yaml.safe_load((ROOT / "specs/model/tiny.yaml").read_text()))
    return ModelSpec.model_validate(MEDIUM)


def train(name: str, mode: str, steps: int, every: int, work: Path) -> dict[str, Any]:
    """`steps` optimizer steps with checkpoints in `mode` (none | sync | async); seconds per step and the
    blocked seconds of the asynchronous checkpoints."""
    torch.manual_seed(0)
    spec = spec_of(name)
    model = TrinityModel(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, T = BATCH[name]
    saver = AsyncCheckpointer() if mode == "async" else None
    root = work / f"{name}-{mode}"
    blocked: list[float] = []
    step_s: list[float] = []

    def one_step() -> None:
        ids = torch.randint(0, spec.vocab_size, (B, T))
        opt.zero_grad(set_to_none=True)
        model(ids, labels_BT=ids).ce_loss.backward()
        opt.step()

    one_step()  # warm-up (allocations, the optimizer's state), not timed
    t_all = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        one_step()
        if mode != "none" and step % every == 0:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
            t1 = time.perf_counter()
            if saver is None:
                save_checkpoint(root, step, state, keep_last=2, distributed=False)
            else:
                saver.submit(root, step, state, keep_last=2)
                blocked.append(time.perf_counter() - t1)
        step_s.append(time.perf_counter() - t0)
    if saver is not None:
        saver.wait()  # the last save is part of the run's cost
    total = time.perf_counter() - t_all
    return {"s_per_step": total / steps, "blocked_s": blocked, "max_step_s": max(step_s)}


def measure(name: str, steps: int, every: int, repeats: int, work: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "sync": [], "async": []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(train(name, mode, steps, every, work))
    per_step = {mode: statistics.median(r["s_per_step"] for r in rs) for mode, rs in runs.items()}
    blocked = [b for r in runs["async"] for b in r["blocked_s"]]
    n_params = sum(p.numel() for p in TrinityModel(spec_of(name)).parameters())
    return {
        "model": name,
        "parameters": n_params,
        "batch": BATCH[name],
        "steps": steps,
        "every": every,
        "s_per_step": per_step,
        "sync_vs_none": per_step["sync"] / per_step["none"],
        "async_vs_none": per_step["async"] / per_step["none"],
        "async_blocked_s_median": statistics.median(blocked) if blocked else None,
        "async_blocked_s_max": max(blocked) if blocked else None,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models", default="tiny,medium")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result["results"] = [
            measure(name, args.steps, args.every, args.repeats, Path(tmp)) for name in args.models.split(",")
        ]
    result["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
