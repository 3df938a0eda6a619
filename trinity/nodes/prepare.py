"""The prepare node of a data phase: tokenize the phase's mix into a committed token store.

`prepare_phase(mix, sources, tokenizer_path, base_dir, out_dir, seed, holdout_documents, workers)`
writes `out_dir/train` (the documents the loaders draw from) and `out_dir/heldout` (the first
`holdout_documents` documents of each source, for held-out loss), both in the format of
`trinity.data.store`. Which documents, and how many, is `trinity.data.mix`'s rule (quota per source =
tokens x weight / sum of weights). Each document is stored as its tokens followed by `<|doc|>`.

Kill safety: everything is written under `<out_dir>.tmp-<pid>`; only when both stores are complete is
that directory renamed to `out_dir`, and the `COMMITTED` markers are written last. A killed run leaves
nothing `open_store` accepts; a rerun first removes the stale temp directories, then starts over.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trinity.data.mix import quotas, take_documents
from trinity.data.store import StoreWriter, clear_stale, commit_dir, temp_dir_for
from trinity.data.tokenizer import load_tokenizer
from trinity.spec.data import MixSpec, Source

TRAIN = "train"
HELDOUT = "heldout"


def store_paths(out_dir: Path | str) -> tuple[Path, Path]:
    """The (train, heldout) store directories of a prepare node's output."""
    return Path(out_dir) / TRAIN, Path(out_dir) / HELDOUT


def prepare_phase(
    mix: MixSpec,
    sources: dict[str, Source],
    tokenizer_path: Path | str,
    base_dir: Path | str,
    out_dir: Path | str,
    seed: int = 0,
    holdout_documents: int = 0,
    workers: int = 2,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tokenize the phase's mix into `out_dir/{train,heldout}`, commit atomically, return metrics.

    The result depends on the mix, the sources, the tokenizer and `holdout_documents`, not on
    `workers` (documents are always taken in stream order) nor on `seed` (accepted for the node
    contract; the loaders, not the store, decide the training order). `progress` shows a bar
    (default: when stderr is a terminal).
    """
    del seed
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(out)
    tmp = temp_dir_for(out)
    tok = load_tokenizer(tokenizer_path)
    names = list(mix.mix)
    quota = quotas(mix.tokens, mix.mix)
    common = {
        "tokenizer_sha256": tok.sha256,
        "doc_token": tok.doc_id,
        "pad_token": tok.pad_id,
        "vocab_size": tok.vocab_size,
    }
    train = StoreWriter(tmp / TRAIN, names, {**common, "split": TRAIN, "quotas": quota})
    heldout = StoreWriter(tmp / HELDOUT, names, {**common, "split": HELDOUT})
    doc_id = tok.doc_id

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [[*ids, doc_id] for ids in tok.encode_batch(texts)]

    passes: dict[str, int] = {}
    t0 = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress
    with Progress(
        TextColumn("prepare {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show,
        transient=True,
    ) as bar:
        for name in names:
            task = bar.add_task(name, total=quota[name])
            passes[name] = 1
            for doc in take_documents(
                name, sources[name], quota[name], holdout_documents, Path(base_dir), encode_batch, workers
            ):
                ids = np.asarray(doc.ids, dtype=np.uint32)
                if doc.heldout:
                    heldout.add(name, ids)
                else:
                    train.add(name, ids)
                    passes[name] = doc.passes
                    bar.advance(task, len(ids))
    train_attrs = train.close({"source_passes": passes})
    heldout.close()
    commit_dir(tmp, out, stores=(TRAIN, HELDOUT))
    seconds = time.perf_counter() - t0
    return {
        "tokens": train.n_tokens,
        "documents": sum(train_attrs["source_documents"].values()),
        "heldout_tokens": heldout.n_tokens,
        "heldout_documents": sum(heldout.source_documents.values()),
        "seconds": seconds,
        "tokens_per_s": (train.n_tokens + heldout.n_tokens) / max(seconds, 1e-9),
        "sources": {
            name: {
                "quota": quota[name],
                "tokens": train.source_tokens[name],
                "documents": train.source_documents[name],
                "heldout_documents": heldout.source_documents[name],
                "passes": passes[name],
            }
            for name in names
        },
        "train_store": str(out / TRAIN),
        "heldout_store": str(out / HELDOUT),
    }
