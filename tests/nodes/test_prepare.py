"""The prepare node: quotas and held-out documents, worker-independence, and kill safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trinity.data.store import open_store
from trinity.data.tokenizer import load_tokenizer, train_tokenizer
from trinity.errors import StoreError
from trinity.nodes.prepare import prepare_phase, store_paths
from trinity.spec.data import DemoSource, MixSpec, Source
from trinity.spec.tokenizer import TokenizerSpec

SOURCES: dict[str, Source] = {
    "docs": DemoSource(corpus="stdlib_docs"),
    "math": DemoSource(corpus="math"),
    "few": DemoSource(corpus="math", seed=1, max_documents=4),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TokenizerSpec(vocab_size=512, sample_bytes=300_000), SOURCES, ".", out)
    return out


def test_quotas_holdout_and_repeats(tok_dir: Path, tmp_path: Path) -> None:
    mix = MixSpec(tokens=40_000, mix={"docs": 2.0, "math": 1.0, "few": 1.0})
    m = prepare_phase(mix, SOURCES, tok_dir, ".", tmp_path / "p", holdout_documents=2, workers=2)
    train, held = (open_store(p) for p in store_paths(tmp_path / "p"))
    doc_id = load_tokenizer(tok_dir).doc_id
    # Every document ends with the boundary token, and only there.
    ends = train.doc_offsets[1:] - 1
    assert (train.tokens[ends] == doc_id).all()
    assert (train.tokens == doc_id).sum() == train.n_docs
    for name, want in (("docs", 20_000), ("math", 10_000), ("few", 10_000)):
        got = train.attrs["source_tokens"][name]
        longest = int(train.doc_lengths[train.doc_source == train.sources.index(name)].max())
        assert want <= got < want + longest, name
        assert held.attrs["source_documents"][name] == 2
    # "few" has 2 worksheets after holding out 2, far from 10k tokens: repeated, and counted.
    assert m["sources"]["few"]["passes"] > 1
    assert train.attrs["source_passes"]["few"] == m["sources"]["few"]["passes"]
    assert train.attrs["tokenizer_sha256"] == load_tokenizer(tok_dir).sha256
    # Held-out documents never appear in the training store.
    train_docs = {train.document(i).tobytes() for i in range(train.n_docs)}
    assert not any(held.document(i).tobytes() in train_docs for i in range(held.n_docs))


def test_result_does_not_depend_on_workers(tok_dir: Path, tmp_path: Path) -> None:
    mix = MixSpec(tokens=15_000, mix={"docs": 1.0, "math": 1.0})
    stores = []
    for w in (1, 3):
        prepare_phase(mix, SOURCES, tok_dir, ".", tmp_path / f"w{w}", holdout_documents=1, workers=w)
        stores.append(open_store(store_paths(tmp_path / f"w{w}")[0]))
    np.testing.assert_array_equal(stores[0].tokens, stores[1].tokens)
    np.testing.assert_array_equal(stores[0].doc_offsets, stores[1].doc_offsets)


SCRIPT = """
import sys
from trinity.nodes.prepare import prepare_phase
from trinity.spec.data import DemoSource, MixSpec
sources = {"docs": DemoSource(corpus="stdlib_docs"), "math": DemoSource(corpus="math")}
mix = MixSpec(tokens=int(sys.argv[3]), mix={"docs": 1.0, "math": 1.0})
prepare_phase(mix, sources, sys.argv[1], ".", sys.argv[2], holdout_documents=1, workers=1)
"""


def test_killed_mid_write_leaves_nothing_finished_and_rerun_completes(tok_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "phase"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tok_dir), str(out), "400000"], cwd=os.getcwd())
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("phase.tmp-*/train/zarr.json")):
        assert proc.poll() is None, "prepare ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # inside the write
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("phase.tmp-*"))  # the half-written store is there...
    for path in (out, *store_paths(out)):
        with pytest.raises(StoreError):  # ...and nothing is taken as finished
            open_store(path)
    m = prepare_phase(MixSpec(tokens=20_000, mix={"docs": 1.0, "math": 1.0}), SOURCES, tok_dir, ".", out, 0, 1, 2)
    assert open_store(store_paths(out)[0]).n_tokens == m["tokens"]
    assert not list(tmp_path.glob("phase.tmp-*"))  # stale temp directories cleared
