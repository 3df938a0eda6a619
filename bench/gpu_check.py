"""One-GPU check of the device-agnostic training path (prints JSON; see bench/README.md).

    python bench/gpu_check.py [--steps 20] [--iters 5] [--precision bf16] [--out FILE]
    python bench/gpu_check.py --device cpu --small      # the same code paths on the CPU, small models

(a) parity: the tiny recipe's model (graphs/tiny.yaml) trained `--steps` optimizer steps by the
    real trainer (trinity.nodes.trainer.Trainer: batches moved with to_device, autocast on the
    device type, the step's collectives and expert-bias update) on the CPU and on the device, from
    the same initial weights on the same synthetic batches; the two loss series must agree to
    the precision's tolerance (bf16: 2e-2 relative, fp32: 1e-3), else the exit code is 1.
(b) throughput: one training step (forward + backward, no optimizer) of a ~1B-active MoE
    (`large_spec`: 16 layers, d_model 2048, 16 experts top-4 + 1 shared; 0.97B active, 1.9B total)
    for trinity's TrinityModel and transformers' AfmoeForCausalLM holding the same weights
    (trinity.interop.hf.from_hf_state_dict), under the same bf16 autocast, timed alternately;
    tokens/s and MFU = achieved FLOP/s (the plan's flops_per_token) / `--peak-tflops`.
(c) peak memory of that step for both (CUDA: allocated and reserved; CPU: peak RSS).

Without CUDA and `--device cuda` (the default) it prints {"skipped": ...} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trinity.data.packing import Batch  # noqa: E402
from trinity.distributed.device import (  # noqa: E402
    autocast,
    model_flops_utilization,
    peak_memory,
    reset_peak_memory,
    synchronize,
)
from trinity.graph.estimates import count_params, flops_per_token  # noqa: E402
from trinity.model import TrinityModel  # noqa: E402
from trinity.nodes.trainer import Trainer, TrainPlan  # noqa: E402
from trinity.optim.groups import build_optimizer  # noqa: E402
from trinity.spec.loading import load_experiment  # noqa: E402
from trinity.spec.model import ModelSpec  # noqa: E402
from trinity.spec.parallel import AcceleratorSpec  # noqa: E402

TOLERANCE = {"bf16": 2e-2, "fp32": 1e-3}
"""Largest relative difference of a step's loss, device run against CPU run."""


class SyntheticBatches:
    """A deterministic, learnable stream: each document follows x' = 5x + 3 mod V from a random start."""

    def __init__(self, vocab: int, micro: int, seq: int) -> None:
        self.vocab, self.micro, self.seq, self.index = vocab, micro, seq, 0

    def next_batch(self) -> Batch:
        g = torch.Generator().manual_seed(1000 + self.index)
        self.index += 1
        B, T = self.micro, self.seq
        starts_BT = torch.rand(B, T + 1, generator=g) < 0.02
        tokens_BT = torch.randint(0, self.vocab, (B, T + 1), generator=g)
        for t in range(1, T + 1):
            follow = (5 * tokens_BT[:, t - 1] + 3) % self.vocab
            tokens_BT[:, t] = torch.where(starts_BT[:, t], tokens_BT[:, t], follow)
        doc_ids_BT = torch.cumsum(starts_BT[:, 1:].long(), dim=1)
        return Batch(tokens_BT[:, :-1].contiguous(), tokens_BT[:, 1:].contiguous(), doc_ids_BT)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def train_losses(device: torch.device, precision: str, steps: int, small: bool) -> dict[str, Any]:
    """`steps` trainer steps of the tiny recipe's model (--small: `small_spec`) with its stability and
    optimizer settings on `device`: losses, seconds, peak memory."""
    spec = load_experiment(ROOT / "graphs" / "tiny.yaml").spec
    model_spec = small_spec() if small else spec.model
    seq, micro, batch = (64, 2, 4) if small else (spec.data.max_seq_len, spec.parallel.micro_batch, 16)
    stability = spec.stability.model_copy(update={"precision": precision})
    run_spec = SimpleNamespace(
        seed=spec.seed,
        model=model_spec,
        parallel=spec.parallel,
        stability=stability,
        optim=spec.optim,
        execution=spec.execution,
    )
    torch.manual_seed(spec.seed)
    model = TrinityModel(model_spec).to(device)  # initialised on the CPU: the same weights on every device
    optimizer = build_optimizer(model, spec.optim)
    plan = TrainPlan("check", 0, steps, 0, seq, micro, lambda tokens: batch, lambda step, tokens: 1.0)
    batches = SyntheticBatches(model_spec.vocab_size, micro, seq)
    trainer = Trainer(SimpleNamespace(spec=run_spec), model, optimizer, batches, plan)  # type: ignore[arg-type]
    losses, seconds, peaks = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        r = trainer.optimizer_step()  # synchronises the device before it returns
        seconds.append(time.perf_counter() - t0)
        trainer.step += 1
        losses.append(r.loss)
        assert r.peak_memory is not None
        peaks.append(r.peak_memory)
    return {
        "device": str(device),
        "losses": losses,
        "median_step_s": sorted(seconds)[len(seconds) // 2],
        "peak_allocated_bytes": max(p.allocated for p in peaks),
        "peak_reserved_bytes": None if peaks[0].reserved is None else max(p.reserved or 0 for p in peaks),
    }


def parity(device: torch.device, precision: str, steps: int, small: bool) -> dict[str, Any]:
    cpu = train_losses(torch.device("cpu"), precision, steps, small)
    dev = train_losses(device, precision, steps, small)
    rel = [abs(a - b) / abs(a) for a, b in zip(cpu["losses"], dev["losses"], strict=True)]
    return {
        "precision": precision,
        "steps": steps,
        "tolerance": TOLERANCE[precision],
        "max_rel_diff": max(rel),
        "ok": max(rel) <= TOLERANCE[precision],
        "cpu": cpu,
        "device": dev,
        "speedup_device_vs_cpu": cpu["median_step_s"] / dev["median_step_s"],
    }


def large_spec() -> ModelSpec:
    """~1B active parameters (0.97B with embedding and head; 1.9B in all), a few wide layers."""
    return ModelSpec.model_validate(
        dict(
            vocab_size=32768,
            d_model=2048,
            n_layers=16,
            n_dense_layers=1,
            n_heads=16,
            n_kv_heads=4,
            head_dim=128,
            dense_hidden=8192,
            global_every=4,
            sliding_window=2048,
            moe=dict(n_experts=16, n_shared_experts=1, top_k=4, expert_hidden=1024, route_scale=2.5),
        )
    )


def small_spec() -> ModelSpec:
    """A few-million-parameter stand-in for `large_spec` (--small: the CPU run of the same code)."""
    return ModelSpec.model_validate(
        dict(
            vocab_size=512,
            d_model=64,
            n_layers=3,
            n_dense_layers=1,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            dense_hidden=128,
            global_every=3,
            sliding_window=32,
            moe=dict(n_experts=4, n_shared_experts=1, top_k=2, expert_hidden=32),
        )
    )


def models(spec: ModelSpec, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Trinity's model and transformers' AfmoeForCausalLM with the same weights, on `device`."""
    from transformers import AfmoeConfig, AfmoeForCausalLM

    from trinity.interop.hf import from_hf_state_dict, hf_config_dict

    torch.manual_seed(0)
    with torch.device(device):
        config: dict[str, Any] = hf_config_dict(spec)
        theirs = AfmoeForCausalLM(AfmoeConfig(**config))
        ours = TrinityModel(spec)
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # transformers zero-initialises routers: make routing real
            if "router" in name:
                p.normal_(0, spec.d_model**-0.5)
    from_hf_state_dict(ours, theirs.state_dict())
    return ours.train(), theirs.train()


def time_pair(
    step_a: Callable[[], None], step_b: Callable[[], None], iters: int, device: torch.device
) -> list[list[float]]:
    """Seconds of `iters` steps of each, alternating a, b, a, b ... after a warm-up of each."""
    step_a()
    step_b()
    times: list[list[float]] = [[], []]
    for _ in range(iters):
        for step, out in ((step_a, times[0]), (step_b, times[1])):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            out.append(time.perf_counter() - t0)
    return times


def throughput(device: torch.device, precision: str, iters: int, small: bool, peak_tflops: float) -> dict[str, Any]:
    spec = small_spec() if small else large_spec()
    B, T = (2, 128) if small else (2, 4096)
    ours, theirs = models(spec, device)
    torch.manual_seed(1)
    ids_BT = torch.randint(0, spec.vocab_size, (B, T), device=device)

    losses: dict[str, torch.Tensor] = {}

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = ours(ids_BT, labels_BT=ids_BT)
        out.ce_loss.backward()
        losses["trinity"] = out.ce_loss.detach()

    def step_theirs() -> None:
        theirs.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = theirs(ids_BT, labels=ids_BT)
        out.loss.backward()
        losses["afmoe"] = out.loss.detach()

    memory: dict[str, dict[str, Any]] = {}
    for name, step in (("trinity", step_ours), ("afmoe", step_theirs)):
        step()  # grads allocated, kernels chosen: the measured step is a steady-state one
        synchronize(device)
        reset_peak_memory(device)
        step()
        synchronize(device)
        p = peak_memory(device)
        # The same weights give the same loss (to the precision): the two models are comparable.
        memory[name] = {
            "loss": float(losses[name]),
            "peak_allocated_bytes": p.allocated,
            "peak_reserved_bytes": p.reserved,
        }
    t_ours, t_theirs = time_pair(step_ours, step_theirs, iters, device)
    fpt = flops_per_token(spec, T)
    result: dict[str, Any] = {"B": B, "T": T, "precision": precision, "peak_tflops": peak_tflops}
    c = count_params(spec)
    result["params"] = {"total": c.total, "active": c.active}
    result["flops_per_token"] = fpt
    for name, times in (("trinity", t_ours), ("afmoe", t_theirs)):
        tokens_per_s = B * T / min(times)
        result[name] = {
            "step_s": times,
            "tokens_per_s": tokens_per_s,
            "mfu": model_flops_utilization(tokens_per_s, fpt, 1, peak_tflops),
            **memory[name],
        }
    result["ratios"] = {
        "tokens_per_s_trinity_over_afmoe": result["trinity"]["tokens_per_s"] / result["afmoe"]["tokens_per_s"],
        "peak_allocated_trinity_over_afmoe": (
            memory["trinity"]["peak_allocated_bytes"] / memory["afmoe"]["peak_allocated_bytes"]
        ),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", default="cuda", help="cuda (default: cuda:LOCAL_RANK) or cpu")
    p.add_argument("--small", action="store_true", help="small models and few steps: a quick run of every path")
    p.add_argument("--steps", type=int, help="parity steps (default 20, --small 3)")
    p.add_argument("--iters", type=int, help="timed steps of each model (default 5, --small 2)")
    p.add_argument("--precision", choices=sorted(TOLERANCE), default="bf16")
    p.add_argument("--peak-tflops", type=float, default=AcceleratorSpec().peak_bf16_tflops, help="MFU's peak (H200)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device here; run on a GPU machine, or with --device cpu --small"}))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        from trinity.distributed.device import training_device

        device = training_device()
    steps = args.steps or (3 if args.small else 20)
    iters = args.iters or (2 if args.small else 5)
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "small": args.small,
        "parity": parity(device, args.precision, steps, args.small),
    }
    if not args.skip_throughput:
        result["throughput"] = throughput(device, args.precision, iters, args.small, args.peak_tflops)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["parity"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
