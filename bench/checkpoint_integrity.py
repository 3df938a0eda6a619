"""What the checksums of checkpoints cost: save and load with and without them, side by side (prints JSON).

The state: `--mb` MB of fp32 tensors shaped like a model's and its AdamW moments' (a few large
matrices, many small vectors that are packed), plus the loop's small leaves. Each repeat saves it
with the checksums (the default: every file hashed after the fsync, sha256 in the marker) and with
the hashing switched off (trinity.store.checkpoint.manifest replaced by one that hashes nothing),
with and without fsync (fsync dominates on a slow disk; without it the ratio is the hashing's
worst case), then loads it with the verification and without (verify_metadata and the checking
store, trinity.store.checkpoint_integrity.VerifyingStore, replaced by a plain read);
the variants alternate, and reads come from the page cache right after the write, for both.
Ratios are with / without (1.10: 10% slower); medians of `--repeats`.

    python bench/checkpoint_integrity.py [--mb 512] [--repeats 5] [--dir /tmp] [--out bench/checkpoint_integrity.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import trinity.store.checkpoint as ckpt
from trinity.store.checkpoint import load_checkpoint, save_checkpoint


def state(mb: int) -> dict[str, Any]:
    """~`mb` MB: weights and two moments of 4 MB matrices, and 200 small vectors per tensor kind."""
    g = torch.Generator().manual_seed(0)
    n_big = max(1, mb // 12)
    model = {f"layers.{i}.w": torch.randn(1024, 1024, generator=g) for i in range(n_big)}
    model |= {f"layers.{i}.norm": torch.randn(1024, generator=g) for i in range(200)}
    moments = {k: (torch.randn_like(v), torch.randn_like(v)) for k, v in model.items()}
    optimizer = {"state": {i: {"exp_avg": a, "exp_avg_sq": b} for i, (a, b) in enumerate(moments.values())}}
    return {"model": model, "optimizer": optimizer, "step": 100, "tokens": 10**9}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _plain_store(path: Path, marker: Any, records: Any) -> None:
    return None  # read_arrays' default: a plain LocalStore, nothing checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tree = state(args.mb)
    nbytes = sum(t.numel() * 4 for t in tree["model"].values()) * 3
    real = (ckpt.manifest, ckpt.verify_metadata, ckpt.reading_store)
    times: dict[str, list[float]] = {}
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="trinity-bench-"))
    try:
        for r in range(args.repeats):
            for fsync in (True, False):
                for hashed in (r % 2 == 0, r % 2 == 1):  # alternate which goes first
                    folder = root / ("hashed" if hashed else "plain")
                    shutil.rmtree(folder, ignore_errors=True)
                    ckpt.manifest = real[0] if hashed else (lambda folder, known=None: {})  # type: ignore[assignment]
                    t = timed(functools.partial(save_checkpoint, folder, 1, tree, keep_last=1, fsync=fsync))
                    times.setdefault(f"save{'' if fsync else '_nofsync'}{'' if hashed else '_unhashed'}", []).append(t)
            ckpt.manifest = real[0]
            path = root / "hashed" / "step-00000001"
            for verified in (r % 2 == 0, r % 2 == 1):
                ckpt.verify_metadata = real[1] if verified else (lambda *a: None)  # type: ignore[assignment]
                ckpt.reading_store = real[2] if verified else _plain_store  # type: ignore[assignment]
                t = timed(functools.partial(load_checkpoint, path))
                times.setdefault("load" if verified else "load_unverified", []).append(t)
            ckpt.verify_metadata, ckpt.reading_store = real[1], real[2]
    finally:
        ckpt.manifest, ckpt.verify_metadata, ckpt.reading_store = real
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bytes": nbytes,
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "seconds_median": {k: round(v, 4) for k, v in sorted(med.items())},
        "save_ratio_with_checksums": round(med["save"] / med["save_unhashed"], 3),
        "save_ratio_with_checksums_no_fsync": round(med["save_nofsync"] / med["save_nofsync_unhashed"], 3),
        "load_ratio_with_verification": round(med["load"] / med["load_unverified"], 3),
        "save_gb_per_s": round(nbytes / med["save"] / 1e9, 3),
        "load_gb_per_s": round(nbytes / med["load"] / 1e9, 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
