"""Throughput of a phase's prepare against the tokenizer's own `encode_batch` on the same text (prints JSON).

Builds, in a temporary directory, a JSONL source of about `--mb` MB (the demo corpus: stdlib code and
docs and math worksheets, deterministic, repeated until the size is reached, split over 8 files) and a
tokenizer (vocab 8192) trained on it, then measures side by side in one run, on all the machine's cores:
- `encode_batch`: `Tokenizer.encode_batch` over every document, in the batches of about
  `trinity.data.piece_store.BATCH_BYTES` the prepare uses (the texts already in memory), and the same
  with `encode_batch_fast` (no character offsets), which is what the prepare calls: the true ceiling;
- `prepare_phase` of the whole source (quota: every token of it; no held-out documents) with
  workers 1 / shards 1, then workers 2 with shards 2 and 4 (each worker gets cores / workers threads),
  from scratch each time (no piece kept), piece size `--piece-mb`.
Each prepare figure is tokens/s of its whole call (reading, tokenizing, writing the pieces, merging)
and `vs_encode_batch` is its ratio to the encode_batch tokens/s.

    python bench/prepare.py [--mb 20] [--piece-mb 2] [--out bench/prepare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from trinity.data.demo import iter_demo
from trinity.data.piece_store import BATCH_BYTES
from trinity.data.store import open_store
from trinity.data.tokenizer import load_tokenizer, train_tokenizer
from trinity.nodes.prepare import prepare_phase, store_paths
from trinity.spec.data import JsonlSource, MixSpec, Source
from trinity.spec.tokenizer import TokenizerSpec

FILES = 8


def build_corpus(root: Path, mb: int) -> list[str]:
    """`mb` MB of JSONL over FILES files; returns the documents in order."""
    base = [
        *iter_demo("stdlib_code", 0, None),
        *iter_demo("stdlib_docs", 0, None),
        *islice(iter_demo("math", 0, None), 5000),
    ]
    docs: list[str] = []
    size = 0
    for text in cycle(base):
        if size >= mb * 10**6:
            break
        docs.append(text)
        size += len(text.encode("utf-8"))
    per_file = -(-len(docs) // FILES)
    for i in range(FILES):
        lines = (json.dumps({"text": d}) + "\n" for d in docs[i * per_file : (i + 1) * per_file])
        (root / f"part-{i:02d}.jsonl").write_text("".join(lines))
    return docs


def encode_batch_rate(tok_dir: Path, docs: list[str], fast: bool = False) -> dict[str, float]:
    tok = load_tokenizer(tok_dir)
    batches: list[list[str]] = [[]]
    size = 0
    for d in docs:
        batches[-1].append(d)
        size += len(d.encode("utf-8"))
        if size >= BATCH_BYTES:
            batches.append([])
            size = 0
    t0 = time.perf_counter()
    if fast:  # what the prepare calls: the same ids without the character offsets
        encoded = (e.ids for batch in batches for e in tok.hf.encode_batch_fast(batch, add_special_tokens=False))
    else:
        encoded = (ids for batch in batches for ids in tok.encode_batch(batch))
    tokens = sum(len(ids) + 1 for ids in encoded)  # + the boundary token
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def prepare_rate(
    sources: dict[str, Source], tok_dir: Path, out: Path, tokens: int, shards: int, workers: int, piece_mb: float
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    mix = MixSpec(tokens=tokens, mix={"web": 1.0})
    t0 = time.perf_counter()
    m = prepare_phase(mix, sources, tok_dir, ".", out, shards=shards, workers=workers, piece_bytes=int(piece_mb * 1e6))
    seconds = time.perf_counter() - t0
    stored = open_store(store_paths(out)[0]).n_tokens
    return {
        "shards": shards,
        "workers": workers,
        "tokens": stored,
        "seconds": seconds,
        "tokens_per_s": stored / seconds,
        "pieces": m["pieces"]["tokenized"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--piece-mb", type=float, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        docs = build_corpus(tmp, args.mb)
        sources: dict[str, Source] = {"web": JsonlSource(paths=(str(tmp / "part-*.jsonl"),))}
        spec = TokenizerSpec(vocab_size=8192, sample_bytes=4_000_000)
        t0 = time.perf_counter()
        train_tokenizer(spec, sources, ".", tmp / "tok")
        train_s = time.perf_counter() - t0
        encode = encode_batch_rate(tmp / "tok", docs)
        fast = encode_batch_rate(tmp / "tok", docs, fast=True)
        runs = [
            prepare_rate(sources, tmp / "tok", tmp / "p", encode["tokens"], shards, workers, args.piece_mb)
            for shards, workers in ((1, 1), (2, 2), (4, 2))
        ]
    for r in runs:
        r["vs_encode_batch"] = r["tokens_per_s"] / encode["tokens_per_s"]
        r["vs_encode_batch_fast"] = r["tokens_per_s"] / fast["tokens_per_s"]
    result = {
        "cpus": os.cpu_count(),
        "text_mb": sum(len(d.encode("utf-8")) for d in docs) / 1e6,
        "documents": len(docs),
        "piece_mb": args.piece_mb,
        "tokenizer_train_s": train_s,
        "encode_batch": encode,
        "encode_batch_fast": fast,
        "prepare": runs,
        "vs_encode_batch": {f"workers{r['workers']}_shards{r['shards']}": round(r["vs_encode_batch"], 3) for r in runs},
        "vs_encode_batch_fast": {
            f"workers{r['workers']}_shards{r['shards']}": round(r["vs_encode_batch_fast"], 3) for r in runs
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
