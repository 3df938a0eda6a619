"""Checkpoint save/load throughput: trinity's Zarr checkpoints vs torch.save/torch.load (prints JSON).

The same training state (a TrinityModel's state_dict, AdamW's state after one step: exp_avg and
exp_avg_sq per parameter, RNG states, loader state), side by side in one process, fp32 and a
bf16 variant (model and moments in bf16, stored as uint16 bit patterns). GB/s = bytes of tensor
data / seconds; medians of `--repeats`, the variants alternating within each repeat. Under
results[dtype]:

    save_vs_torch           trinity's default save (fsync of every file, checksums in the marker)
                            vs torch.save followed by an fsync of its file: durable vs durable
    save_vs_torch_nofsync   trinity with fsync=False vs plain torch.save
    load_vs_torch           loads from disk: the page cache is dropped before each timed load of
                            either side (sync; echo 3 > /proc/sys/vm/drop_caches; needs root, and
                            `page_cache_dropped` says whether it worked)
    load_vs_torch_warm      the same file loaded again, from the page cache

Above 1: trinity faster. zstd level 1 and blosc-lz4 saves and cold loads are timed too (fewer
repeats). The JSON records the load average: other jobs on the machine move the figures.

    python bench/checkpoint.py [--model medium|tiny] [--repeats 3] [--dir /tmp] [--out bench/checkpoint.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trinity.model import TrinityModel
from trinity.nodes.seeds import capture_rng_state
from trinity.spec.model import ModelSpec
from trinity.store.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# ~50M parameters (the Trinity layer structure at d_model 512), so with AdamW's two moments the
# state holds ~150M numbers: 600 MB in fp32.
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


def training_state(model_name: str, dtype: torch.dtype) -> dict[str, Any]:
    torch.manual_seed(0)
    if model_name == "tiny":
        spec = ModelSpec.model_validate(yaml.safe_load((ROOT / "specs/model/tiny.yaml").read_text()))
    else:
        spec = ModelSpec.model_validate(MEDIUM)
    model = TrinityModel(spec).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "loader": {"cursor": 123, "order": np.arange(10_000, dtype=np.int64), "epoch": 1},
        "rng": capture_rng_state(),
        "step": 1,
        "tokens": 1 << 30,
    }


def tensor_bytes(state: dict[str, Any]) -> int:
    total = 0

    def walk(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, np.ndarray):
            total += v.nbytes
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(state)
    return total


def dir_bytes(path: Path) -> int:
    return sum((Path(d) / f).stat().st_size for d, _, fs in os.walk(path) for f in fs)


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (root only), so that the next read comes from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed(fn: Callable[[], Any], before: Callable[[], Any] = lambda: None) -> float:
    before()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def torch_save(state: dict[str, Any], path: Path, fsync: bool) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def measure(model_name: str, dtype: torch.dtype, repeats: int, work: Path) -> dict[str, Any]:
    """Every variant timed `repeats` times, the two sides alternating within each repeat; medians."""
    state = training_state(model_name, dtype)
    nbytes = tensor_bytes(state)
    out: dict[str, Any] = {
        "params": sum(v.numel() for v in state["model"].values()),
        "tensor_bytes": nbytes,
        "n_tensors": sum(1 for _ in state["model"]) + sum(len(s) for s in state["optimizer"]["state"].values()),
    }
    pt = work / "state.pt"
    saves: dict[str, Callable[[], Any]] = {
        "torch+fsync": lambda: torch_save(state, pt, True),
        "trinity": lambda: save_checkpoint(work / "trinity", 1, state, 1),
        "torch": lambda: torch_save(state, pt, False),
        "trinity_nofsync": lambda: save_checkpoint(work / "trinity", 1, state, 1, fsync=False),
    }
    ckpt = work / "trinity" / "step-00000001"
    loads: dict[str, Callable[[], Any]] = {
        "torch": lambda: torch.load(pt, weights_only=False),
        "trinity": lambda: load_checkpoint(ckpt),
    }
    times: dict[str, list[float]] = {}

    def clear(name: str) -> None:
        if name.startswith("torch"):
            pt.unlink(missing_ok=True)
        else:
            shutil.rmtree(work / "trinity", ignore_errors=True)
        os.sync()  # earlier writes' writeback does not run into the next timed save

    dropped = True
    for _ in range(repeats):
        for name, fn in saves.items():
            times.setdefault(f"{name}_save", []).append(timed(fn, lambda n=name: clear(n)))  # type: ignore[misc]
        for cache in ("cold", "warm"):
            for name, fn in loads.items():
                if cache == "cold":
                    dropped &= drop_caches()
                else:
                    fn()  # into the page cache
                times.setdefault(f"{name}_load_{cache}", []).append(timed(fn))
    out["torch_file_bytes"] = pt.stat().st_size
    out["trinity_bytes"] = dir_bytes(ckpt)
    for name, kw in {"trinity_zstd1": {"compression": "zstd"}, "trinity_lz4": {"compression": "lz4"}}.items():
        root = work / name
        path = root / "step-00000001"
        for _ in range(max(1, repeats // 3)):
            times.setdefault(f"{name}_save", []).append(
                timed(lambda r=root, k=kw: save_checkpoint(r, 1, state, 1, **k), lambda r=root: shutil.rmtree(r, True))  # type: ignore[misc]
            )
            dropped &= drop_caches()
            times.setdefault(f"{name}_load_cold", []).append(timed(lambda p=path: load_checkpoint(p)))  # type: ignore[misc]
        out[f"{name}_bytes"] = dir_bytes(path)
        shutil.rmtree(root)
    for key, ts in times.items():
        out[f"{key}_gbs"] = nbytes / statistics.median(ts) / 1e9
    out["page_cache_dropped"] = dropped
    out["save_vs_torch"] = out["trinity_save_gbs"] / out["torch+fsync_save_gbs"]
    out["save_vs_torch_nofsync"] = out["trinity_nofsync_save_gbs"] / out["torch_save_gbs"]
    out["load_vs_torch"] = out["trinity_load_cold_gbs"] / out["torch_load_cold_gbs"]
    out["load_vs_torch_warm"] = out["trinity_load_warm_gbs"] / out["torch_load_warm_gbs"]

    back = load_checkpoint(save_checkpoint(work / "check", 1, state, 1))  # the bench state round-trips exactly
    assert all(torch.equal(a.view(torch.uint8) if a.ndim else a, b.view(torch.uint8) if b.ndim else b)
               for a, b in zip(state["model"].values(), back["model"].values(), strict=True))  # fmt: skip
    shutil.rmtree(work / "check")
    clear("torch")
    clear("trinity")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["medium", "tiny"], default="medium")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        result = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "model": args.model,
            "repeats": args.repeats,
            "load_average": os.getloadavg(),
            "results": {
                str(dt).removeprefix("torch."): measure(args.model, dt, args.repeats, Path(d))
                for dt in (torch.float32, torch.bfloat16)
            },
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
