"""Loader and tokenizer throughput vs what the tiny model consumes in training (prints JSON).

Builds the tiny recipe's data on the spot (tokenizer of specs/tokenizer/tiny.yaml on the demo corpus,
the store of phase1 of specs/data/tiny.yaml) in a temporary directory, then measures, in one process:
- the tokenizer's encode MB/s on demo documents (Rust core, all its threads) and its training MB/s;
- tokens/s of the sequential and RSDB loaders at sequence lengths 256 (tiny), 512 and 4096,
  micro-batch 8, one worker, with the peak Python/numpy memory of the loop (tracemalloc);
- RSDB at the paper's buffer shape (4096 per rank = 8192 internal, 4 workers) on a synthetic
  long-tailed store of 60k documents, seq 4096;
- the mean number of distinct documents per micro-batch, both loaders, at the tiny layout
  (seq 256, micro-batch 4 and 16, buffer 64);
- the memory the loaders hold besides: the store's tokens, resident as one uint32 array;
- the tiny model's training tokens/s: `TrinityModel` (specs/model/tiny.yaml) forward + backward
  with intra-document masking on loader batches (B 4, T 256), one thread (no optimizer step, which
  would only lower it), and the ratio loader / training, which must be >= 100.

Loaders are single-threaded Python, so every loader figure is one core's.

    python bench/loader.py [--seconds 2] [--out bench/loader.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trinity.data.demo import iter_demo
from trinity.data.loaders import RsdbLoader, SequentialLoader, distinct_documents
from trinity.data.packing import PackedLoader
from trinity.data.store import StoreWriter, TokenStore, commit_dir, open_store, temp_dir_for
from trinity.data.tokenizer import load_tokenizer, train_tokenizer
from trinity.nodes.prepare import prepare_phase, store_paths
from trinity.spec.data import DataSpec
from trinity.spec.model import ModelSpec
from trinity.spec.tokenizer import TokenizerSpec

ROOT = Path(__file__).resolve().parents[1]


def load_yaml(rel: str) -> Any:
    return yaml.safe_load((ROOT / rel).read_text())


def loader_rate(make: Any, seconds: float) -> dict[str, float]:
    """Tokens/s of a loader's `next_batch` over `seconds`, and the loop's peak traced memory."""
    loader: PackedLoader = make()
    loader.next_batch()  # warm: first epoch order, first buffer fill
    tracemalloc.start()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += loader.next_batch().tokens_BT.numel()
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"tokens_per_s": n / dt, "peak_traced_mib": peak / 2**20}


def mean_distinct(loader: PackedLoader, batches: int = 200) -> float:
    return float(np.mean([distinct_documents(loader.next_batch()) for _ in range(batches)]))


def synthetic_store(path: Path, n_docs: int) -> TokenStore:
    rng = np.random.default_rng(0)
    tmp = temp_dir_for(path)
    w = StoreWriter(tmp, ["synthetic"])
    for n in np.clip(rng.lognormal(5.5, 1.3, size=n_docs), 2, 50_000).astype(int):
        w.add("synthetic", rng.integers(1, 4096, size=n).astype(np.uint32))
    w.close()
    commit_dir(tmp, path)
    return open_store(path)


def training_rate(store: TokenStore, seconds: float) -> dict[str, float]:
    """Tiny model forward + backward tokens/s on RSDB batches, one thread."""
    from trinity.model import TrinityModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = TrinityModel(ModelSpec.model_validate(load_yaml("specs/model/tiny.yaml")))
        loader = RsdbLoader(store, 256, 4, buffer_size=64)
        batch = loader.next_batch()
        model(batch.tokens_BT, batch.doc_ids_BT, batch.targets_BT).ce_loss.backward()  # warm
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = loader.next_batch()
            model.zero_grad(set_to_none=True)
            out = model(batch.tokens_BT, batch.doc_ids_BT, batch.targets_BT)
            out.ce_loss.backward()
            n += batch.tokens_BT.numel()
        return {"tokens_per_s": n / (time.perf_counter() - t0), "threads": 1, "batch": [4, 256]}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per point")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data = DataSpec.model_validate(load_yaml("specs/data/tiny.yaml"))
        tok_spec = TokenizerSpec.model_validate(load_yaml("specs/tokenizer/tiny.yaml"))
        tok_metrics = train_tokenizer(tok_spec, data.sources, ROOT / "specs/data", tmp / "tok")
        tok = load_tokenizer(tmp / "tok")
        docs = [d for c in ("stdlib_code", "stdlib_docs", "math") for d in itertools.islice(iter_demo(c, 7), 60)]
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        t0 = time.perf_counter()
        tok.encode_batch(docs)
        batch_rate = mb / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for d in docs:
            tok.encode(d)
        single_rate = mb / (time.perf_counter() - t0)
        result["tokenizer"] = {
            "encode_batch_mb_per_s": batch_rate,
            "encode_one_thread_mb_per_s": single_rate,
            "train_mb_per_s": tok_metrics["train_mb_per_s"],
            "bytes_per_token": {k: v["bytes_per_token"] for k, v in tok_metrics["sources"].items()},
            "sample_mb": mb,
        }
        phase = data.phases[0]
        prep = prepare_phase(
            phase, data.sources, tmp / "tok", ROOT / "specs/data", tmp / "phase1", 0, data.holdout_documents, workers=2
        )
        store = open_store(store_paths(tmp / "phase1")[0])
        result["store"] = {
            "tokens": store.n_tokens,
            "documents": store.n_docs,
            "prepare_tokens_per_s": prep["tokens_per_s"],
            "doc_tokens_p50_p90_p99_max": [int(x) for x in np.percentile(store.doc_lengths, [50, 90, 99, 100])],
        }

        loaders: dict[str, Any] = {}
        for T in (256, 512, 4096):
            loaders[f"seq{T}"] = {
                "sequential": loader_rate(lambda T=T: SequentialLoader(store, T, 8), args.seconds),
                "rsdb": loader_rate(lambda T=T: RsdbLoader(store, T, 8, buffer_size=64), args.seconds),
            }
        big = synthetic_store(tmp / "synthetic", 60_000)
        loaders["rsdb_paper_buffer_seq4096"] = {
            "store_tokens": big.n_tokens,
            "store_resident_mib": big.tokens.nbytes / 2**20,
            "buffer_size": 4096,
            "workers": 4,
            **loader_rate(lambda: RsdbLoader(big, 4096, 8, workers=4, buffer_size=4096), args.seconds),
        }
        result["loaders"] = loaders

        result["distinct_docs_per_micro_batch"] = {
            f"seq256_mb{B}": {
                "sequential": (s := mean_distinct(SequentialLoader(store, 256, B))),
                "rsdb": (r := mean_distinct(RsdbLoader(store, 256, B, buffer_size=64))),
                "ratio": r / s,
            }
            for B in (4, 16)
        }
        train = training_rate(store, args.seconds * 3)
        result["tiny_training"] = train
        rsdb_min = min(loaders[k]["rsdb"]["tokens_per_s"] for k in ("seq256", "seq512", "seq4096"))
        result["ratio_rsdb_over_training"] = {
            "seq256": loaders["seq256"]["rsdb"]["tokens_per_s"] / train["tokens_per_s"],
            "worst_of_256_512_4096": rsdb_min / train["tokens_per_s"],
        }
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
