"""Training-step throughput and memory of trinity vs transformers' AfmoeForCausalLM (prints JSON).

Same config, same weights (exported with trinity.interop.hf), same batch, same precision, side by
side in one process: tokens/s of forward + backward (loss.backward(), no optimizer), their ratio,
the step's achieved FLOP/s as a fraction of one large matmul's FLOP/s in the same dtype on this
machine, and peak memory (resident set, measured in a fresh subprocess per point) of forward +
backward at 4k and 16k tokens. Precisions: fp32, and bf16 autocast (`stability.precision: bf16`,
the recipe's training precision), both models under the same `torch.autocast`.

    python bench/model.py [--iters 7] [--precisions fp32,bf16] [--out bench/model.json] [--skip-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from trinity.interop.hf import save_pretrained
from trinity.model import TrinityModel
from trinity.spec.model import ModelSpec

ROOT = Path(__file__).resolve().parents[1]

# ~50M parameters: the Trinity layer structure at d_model 512 (3 local + 1 global, 1 dense layer).
MEDIUM = dict(
    vocab_size=16384,
    d_model=512,
    n_layers=8,
    n_dense_layers=1,
    n_heads=8,
    n_kv_heads=2,
    head_dim=64,
    dense_hidden=1536,
    sliding_window=512,
    moe=dict(n_experts=8, top_k=2, expert_hidden=256, n_shared_experts=1, route_scale=2.826),
)


def config(name: str) -> ModelSpec:
    if name == "tiny":
        return ModelSpec.model_validate(yaml.safe_load((ROOT / "specs/model/tiny.yaml").read_text()))
    return ModelSpec.model_validate(MEDIUM)


def step_flops(spec: ModelSpec, B: int, T: int) -> float:
    """Forward + backward FLOPs: 6 x active matmul params per token, plus attention scores and values."""
    d, m = spec.d_model, spec.moe
    attn = d * (2 * spec.attn_width + 2 * spec.kv_width) + spec.attn_width * d
    dense = 3 * d * spec.dense_hidden
    moe = 3 * d * m.expert_hidden * (m.top_k + m.n_shared_experts) + d * m.n_experts
    per_token = spec.n_layers * attn + spec.n_dense_layers * dense + spec.n_moe_layers * moe
    per_token += d * spec.vocab_size  # head
    keys = 0.0  # keys attended, summed over queries and layers
    for kind in spec.attention_types():
        w = T if kind == "global" else min(spec.sliding_window, T)
        keys += T * w - w * (w - 1) / 2  # causal, window w
    attn_flops = 4 * spec.n_heads * spec.head_dim * keys  # QK^T and PV, 2 FLOPs per MAC
    return 3 * B * (2 * per_token * T + attn_flops)


def matmul_flops_per_s(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    """The training step's precision context: bf16 autocast (as trinity's trainer uses) or none."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def models(spec: ModelSpec) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import AfmoeForCausalLM

    torch.manual_seed(0)
    ours = TrinityModel(spec)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        theirs = AfmoeForCausalLM.from_pretrained(d)
    return ours.train(), theirs.train()


def time_pair(fn_a: Any, fn_b: Any, iters: int) -> tuple[list[float], list[float]]:
    """Seconds of `iters` steps of each, run alternately (a, b, a, b, ...) after one warm-up each,
    so that load from other processes on a shared machine hits both alike."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(iters):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times_a, times_b


def throughput(name: str, B: int, T: int, iters: int, precision: str, peak: float) -> dict[str, Any]:
    spec = config(name)
    ours, theirs = models(spec)
    torch.manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (B, T))

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        with autocast(precision):
            out = ours(ids, labels_BT=ids)
        out.ce_loss.backward()

    def step_theirs() -> None:
        theirs.zero_grad(set_to_none=True)
        with autocast(precision):
            out = theirs(ids, labels=ids)
        out.loss.backward()

    times_ours, times_theirs = time_pair(step_ours, step_theirs, iters)
    t_ours, t_theirs = min(times_ours), min(times_theirs)
    flops = step_flops(spec, B, T)
    return {
        "config": name,
        "precision": precision,
        "params": sum(p.numel() for p in ours.parameters()),
        "batch": [B, T],
        "trinity_tokens_per_s": B * T / t_ours,
        "afmoe_tokens_per_s": B * T / t_theirs,
        # Best step against best step (the least disturbed of each), and the median over the
        # adjacent (trinity, afmoe) pairs, which shared the machine's load of the moment.
        "speedup": t_theirs / t_ours,
        "speedup_median_of_pairs": statistics.median(b / a for a, b in zip(times_ours, times_theirs, strict=True)),
        "trinity_step_s": sorted(times_ours),
        "afmoe_step_s": sorted(times_theirs),
        "step_flops": flops,
        "trinity_flops_fraction_of_matmul": flops / t_ours / peak,
        "afmoe_flops_fraction_of_matmul": flops / t_theirs / peak,
    }


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_point(impl: str, T: int) -> dict[str, Any]:
    """Run in a fresh process: peak resident set of one forward + backward at B=1, T tokens,
    above the resident set just before it (the high-water mark is reset first, so building and
    exporting the models does not hide the step's peak)."""
    spec = config("medium")
    ours, theirs = models(spec)
    model = ours if impl == "trinity" else theirs
    del ours, theirs
    gc.collect()
    ids = torch.randint(0, spec.vocab_size, (1, T))
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux)
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if impl == "trinity":
        model(ids, labels_BT=ids).ce_loss.backward()
    else:
        model(ids, labels=ids).loss.backward()
    peak = _status_kib("VmHWM")
    dense_mask_bytes = spec.n_heads * T * T * 4
    return {
        "impl": impl,
        "tokens": T,
        "peak_step_mib": (peak - base) / 1024,
        "seconds": time.perf_counter() - t0,
        "one_fp32_heads_x_T2_tensor_mib": dense_mask_bytes / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--out", type=Path)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-impls", default="trinity,afmoe")
    p.add_argument("--_memory", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory:
        print(json.dumps(memory_point(args._memory[0], int(args._memory[1]))))
        return
    precisions = args.precisions.split(",")
    peaks = {p: matmul_flops_per_s(torch.bfloat16 if p == "bf16" else torch.float32) for p in precisions}
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "matmul_gflops": {p: peak / 1e9 for p, peak in peaks.items()},
        "throughput": [
            throughput(name, B, T, args.iters, precision, peaks[precision])
            for precision in precisions
            for name, B, T in (("tiny", 8, 512), ("medium", 2, 1024))
        ],
    }
    if not args.skip_memory:
        mem = []
        for impl in args.memory_impls.split(","):
            for T in (4096, 16384):
                cmd = [sys.executable, __file__, "--_memory", impl, str(T)]
                run = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if run.returncode != 0:
                    mem.append({"impl": impl, "tokens": T, "error": run.stderr.strip().splitlines()[-1:]})
                else:
                    mem.append(json.loads(run.stdout.strip().splitlines()[-1]))
        result["memory_medium_B1"] = mem
        for impl in args.memory_impls.split(","):
            pts = {m["tokens"]: m.get("peak_step_mib") for m in mem if m["impl"] == impl}
            if pts.get(4096) and pts.get(16384):
                result[f"{impl}_memory_growth_4k_to_16k"] = pts[16384] / pts[4096]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    assert all(math.isfinite(peak) for peak in peaks.values())


if __name__ == "__main__":
    main()
