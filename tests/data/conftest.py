"""Fixtures of the data tests: a small tokenizer trained once, a demo phase store, synthetic stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trinity.data.store import StoreWriter, TokenStore, commit_dir, open_store
from trinity.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from trinity.nodes.prepare import prepare_phase, store_paths
from trinity.spec.data import DemoSource, MixSpec, Source
from trinity.spec.tokenizer import TokenizerSpec

DEMO_SOURCES: dict[str, Source] = {
    "code": DemoSource(corpus="stdlib_code"),
    "docs": DemoSource(corpus="stdlib_docs"),
    "math": DemoSource(corpus="math"),
}


def make_store(path: Path, lengths: list[int], vocab: int = 1000, seed: int = 0) -> TokenStore:
    """A committed store of random documents with the given lengths (boundary token 0 last in each)."""
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    writer = StoreWriter(tmp, ["a", "b"], {"split": "train", "doc_token": 0})
    for i, n in enumerate(lengths):
        ids = rng.integers(1, vocab, size=n).astype(np.uint32)
        ids[-1] = 0
        writer.add("ab"[i % 2], ids)
    writer.close()
    commit_dir(tmp, path)
    return open_store(path)


def long_tail_lengths(n: int, seed: int = 0) -> list[int]:
    """Lognormal document lengths (median ~150 tokens, a few of several thousand)."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(5.0, 1.2, size=n), 2, 20_000)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    spec = TokenizerSpec(vocab_size=768, sample_bytes=600_000)
    train_tokenizer(spec, DEMO_SOURCES, ".", out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def demo_store(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenStore:
    """A phase of the demo corpus: 120k tokens, docs/code/math, 4 documents held out per source."""
    out = tmp_path_factory.mktemp("phase") / "phase"
    mix = MixSpec(tokens=120_000, mix={"docs": 0.5, "code": 0.3, "math": 0.2}, seq_len=256)
    prepare_phase(mix, DEMO_SOURCES, tokenizer_dir, ".", out, holdout_documents=4, workers=2)
    return open_store(store_paths(out)[0])
