"""Distributed training steps on this machine: scaling from 1 to 2 to 4 processes, and all-to-all traffic.

Each layout runs the real distributed trainer (build_training + Trainer.train_step: FSDP2, expert
parallelism with all-to-all, Muon on sharded parameters) on gloo ranks spawned here, one torch
thread per process, on the same global batch (--batch sequences of --seq tokens, micro-batches of
--micro). It reports per layout: seconds per optimizer step (slowest rank, best of --steps after a
warm-up step), global tokens/s, the speed-up over one process, and per step and rank the bytes
the all-to-all exchanges send and receive (forward and backward) and the seconds they take.

    python bench/distributed.py [--steps 3] [--out bench/distributed.json]

CPU figures are for regression, not for bragging: on 2 cores, 4 processes oversubscribe.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml

from trinity.data.packing import Batch
from trinity.distributed import expert_parallel
from trinity.distributed.testing import run_workers
from trinity.nodes.trainer import Trainer, TrainPlan, build_training
from trinity.spec.execution import ExecutionSpec
from trinity.spec.model import ModelSpec
from trinity.spec.optim import OptimSpec
from trinity.spec.parallel import ParallelSpec
from trinity.spec.stability import StabilitySpec

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [  # (name, world, fsdp_group, ep)
    ("single", 1, 1, 1),
    ("fsdp2", 2, 2, 1),
    ("fsdp2-ep2", 2, 2, 2),
    ("hsdp2x2-ep2", 4, 2, 2),
]


class RandomBatches:
    def __init__(self, vocab: int, micro: int, seq: int) -> None:
        self.vocab, self.micro, self.seq, self.index = vocab, micro, seq, 0

    def next_batch(self) -> Batch:
        g = torch.Generator().manual_seed(self.index)
        self.index += 1
        tokens = torch.randint(0, self.vocab, (self.micro, self.seq + 1), generator=g)
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.zeros(self.micro, self.seq))

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def _steps(rank: int, world: int, fsdp_group: int, ep: int, args: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = ModelSpec.model_validate(yaml.safe_load((ROOT / "specs/model/tiny.yaml").read_text()))
    spec = SimpleNamespace(
        seed=0,
        model=model,
        parallel=ParallelSpec(
            nodes=1, gpus_per_node=world, fsdp_group=fsdp_group, ep=ep, micro_batch=args["micro"], param_dtype="fp32"
        ),
        stability=StabilitySpec(),
        optim=OptimSpec(),
        execution=ExecutionSpec(),
    )
    ctx = SimpleNamespace(spec=spec)
    training = build_training(ctx, RandomBatches(model.vocab_size, args["micro"], args["seq"]))  # type: ignore[arg-type]
    plan = TrainPlan("bench", 0, 10**9, 0, args["seq"], args["micro"], lambda t: args["batch"], lambda s, t: 1.0)
    trainer = Trainer(ctx, training.model, training.optimizer, training.batches, plan, None, sharding=training.sharding)  # type: ignore[arg-type]
    trainer.train_step()  # warm-up
    times, traffic = [], []
    for _ in range(args["steps"]):
        expert_parallel.reset_stats()
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
        traffic.append(expert_parallel.read_stats())
    best = min(range(len(times)), key=times.__getitem__)
    return {"seconds": times[best], "all_to_all": traffic[best]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="global batch, sequences")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = {"steps": args.steps, "seq": args.seq, "micro": args.micro, "batch": args.batch}
    tokens = args.batch * args.seq
    rows: list[dict[str, Any]] = []
    for name, world, fsdp_group, ep in LAYOUTS:
        per_rank = run_workers(_steps, world, fsdp_group, ep, settings, timeout_s=900)
        seconds = max(r["seconds"] for r in per_rank)
        a2a = per_rank[0]["all_to_all"]
        rows.append(
            {
                "layout": name,
                "processes": world,
                "step_s": round(seconds, 4),
                "tokens_per_s": round(tokens / seconds, 1),
                "all_to_all_bytes_sent_per_rank": int(a2a["forward_bytes_sent"] + a2a["backward_bytes_sent"]),
                "all_to_all_bytes_received_per_rank": int(
                    a2a["forward_bytes_received"] + a2a["backward_bytes_received"]
                ),
                "all_to_all_s_per_rank": round(a2a["forward_seconds"] + a2a["backward_seconds"], 4),
                "all_to_all_calls": int(a2a["forward_calls"] + a2a["backward_calls"]),
            }
        )
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_single"] = round(row["tokens_per_s"] / base, 3)
    result = {
        "model": "specs/model/tiny.yaml",
        "global_batch": [args.batch, args.seq],
        "micro_batch": args.micro,
        "threads_per_process": 1,
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "layouts": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
