"""Both loaders: one pass yields each stored token exactly once, resume is exact, RSDB mixes documents."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data.conftest import long_tail_lengths, make_store
from trinity.data.loaders import RsdbLoader, SequentialLoader, build_loader, distinct_documents
from trinity.data.packing import IGNORE, PackedLoader
from trinity.data.store import TokenStore
from trinity.spec import data as data_spec

KINDS = ["sequential", "rsdb"]
# (data-parallel ranks, workers per rank): 1, 2 and 4 streams in all.
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> TokenStore:
    return make_store(tmp_path_factory.mktemp("s") / "store", long_tail_lengths(300), seed=1)


def make(
    kind: str,
    store: TokenStore,
    seq_len: int = 64,
    micro_batch: int = 3,
    rank: int = 0,
    world: int = 1,
    workers: int = 1,
    seed: int = 0,
    buffer_size: int = 8,
) -> PackedLoader:
    if kind == "rsdb":
        return RsdbLoader(store, seq_len, micro_batch, rank, world, workers, seed, buffer_size)
    return SequentialLoader(store, seq_len, micro_batch, rank, world, workers, seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("world", "workers"), LAYOUTS)
def test_one_pass_yields_every_token_once(store: TokenStore, kind: str, world: int, workers: int) -> None:
    """Tokens of epoch 0 over all ranks: the store's multiset; each document read in order, whole."""
    seq_len, mb = 64, 3
    per_rank_batches = 3 * store.n_tokens // (world * seq_len * mb) + 10  # ~3 epochs: epoch 0 is done
    per_doc: dict[int, list[np.ndarray]] = {}
    yielded = Counter[int]()
    for rank in range(world):
        loader = make(kind, store, seq_len, mb, rank, world, workers, seed=3)
        for _ in range(per_rank_batches):
            b = loader.next_batch()
            assert b.tokens_BT.shape == (mb, seq_len)  # sequences are full
            ids, toks = b.doc_ids_BT.numpy().ravel(), b.tokens_BT.numpy().ravel()
            first = ids < store.n_docs
            yielded.update(toks[first].tolist())
            # Per document, record tokens in the order the stream produced them.
            for d in np.unique(ids[first]):
                per_doc.setdefault(int(d), []).append(toks[ids == d])
    assert yielded == Counter(store.tokens.tolist())
    assert sorted(per_doc) == list(range(store.n_docs))
    for d, parts in per_doc.items():
        np.testing.assert_array_equal(np.concatenate(parts), store.document(d))


def position_store(path: Path, lengths: list[int]) -> TokenStore:
    """A store whose every token is its own position in the store: targets can be checked by arithmetic."""
    store = make_store(path, lengths)
    store._tokens = np.arange(store.n_tokens, dtype=np.uint32)
    return store


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_targets_and_doc_ids_follow_the_store(tmp_path: Path, kind: str) -> None:
    store = position_store(tmp_path / "p", long_tail_lengths(200, seed=4))
    last_of_doc = set((store.doc_offsets[1:] - 1).tolist())
    doc_of = np.repeat(np.arange(store.n_docs), store.doc_lengths)
    loader = make(kind, store, seq_len=50, micro_batch=4, workers=2)
    for _ in range(100):
        b = loader.next_batch()
        pos, tgt, ids = (x.numpy().ravel() for x in (b.tokens_BT, b.targets_BT, b.doc_ids_BT))
        np.testing.assert_array_equal(ids % store.n_docs, doc_of[pos])
        want = np.where(np.isin(pos, list(last_of_doc)), IGNORE, pos + 1)
        np.testing.assert_array_equal(tgt, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 2)])
def test_resume_at_random_points_is_exact(store: TokenStore, kind: str, world: int, workers: int) -> None:
    rng = np.random.default_rng(0)
    rank = world - 1
    reference = make(kind, store, rank=rank, world=world, workers=workers, seed=5)
    stream = [reference.next_batch() for _ in range(200)]
    for stop in rng.choice(200, size=6, replace=False):
        first = make(kind, store, rank=rank, world=world, workers=workers, seed=5)
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
        resumed = make(kind, store, rank=rank, world=world, workers=workers, seed=5)
        resumed.load_state_dict(state)
        for want in stream[stop : stop + 40]:
            got = resumed.next_batch()
            for name in ("tokens_BT", "targets_BT", "doc_ids_BT"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (kind, int(stop), name)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_for_a_seed_and_seed_dependent(store: TokenStore, kind: str) -> None:
    a = [make(kind, store, seed=1).next_batch().tokens_BT for _ in range(1)]
    b = [make(kind, store, seed=1).next_batch().tokens_BT for _ in range(1)]
    c = [make(kind, store, seed=2).next_batch().tokens_BT for _ in range(1)]
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_state_mismatch_is_refused(store: TokenStore) -> None:
    state = make("rsdb", store, seq_len=64).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        make("rsdb", store, seq_len=32).load_state_dict(state)


def test_rsdb_buffer_stays_between_size_and_twice_size(store: TokenStore) -> None:
    loader = make("rsdb", store, seq_len=64, buffer_size=12, workers=2)
    for _ in range(300):
        loader.next_batch()
        for s in loader.streams:
            assert 6 <= len(s.buf_doc) <= 12  # type: ignore[attr-defined]


def test_rsdb_takes_whole_rest_of_document_or_fills_sequence(store: TokenStore) -> None:
    """Each piece either ends its document or fills the sequence: heads only advance by what fits."""
    loader = make("rsdb", store, seq_len=64, micro_batch=1)
    for _ in range(300):
        segments = loader.next_sequences()[0]
        for i, (doc, _, _a, b) in enumerate(segments):
            assert b == store.doc_offsets[doc + 1] or i == len(segments) - 1


def test_sequential_keeps_documents_consecutive(store: TokenStore) -> None:
    """The baseline: a sequence continues where the previous one stopped."""
    loader = make("sequential", store, seq_len=64, micro_batch=1)
    prev = loader.next_sequences()[0]
    for _ in range(100):
        cur = loader.next_sequences()[0]
        last_doc, last_epoch, _, last_end = prev[-1]
        first_doc, first_epoch, first_start, _ = cur[0]
        if last_end < store.doc_offsets[last_doc + 1]:
            assert (first_doc, first_epoch, first_start) == (last_doc, last_epoch, last_end)
        prev = cur


def test_build_loader_from_spec(store: TokenStore) -> None:
    r = build_loader(data_spec.RsdbLoader(buffer_size=16, workers=2), store, 32, 2, 1, 2, 0)
    assert isinstance(r, RsdbLoader) and r.workers == 2 and r.buffer_size == 16
    s = build_loader(data_spec.SequentialLoader(), store, 32, 2, 0, 1, 0)
    assert isinstance(s, SequentialLoader)
    assert s.next_batch().tokens_BT.dtype == torch.int64


def test_too_few_documents_is_a_clear_error(tmp_path: Path) -> None:
    small = make_store(tmp_path / "s", [10, 20, 30])
    with pytest.raises(ValueError, match="fewer than the 4 loader streams"):
        make("sequential", small, world=2, workers=2)


def test_rsdb_mixes_documents_on_the_demo_corpus(demo_store: TokenStore) -> None:
    """The tiny recipe's shape (seq 256, buffer 64): RSDB's micro-batches hold several times the documents."""

    def mean_distinct(loader: PackedLoader) -> float:
        return float(np.mean([distinct_documents(loader.next_batch()) for _ in range(100)]))

    seq = mean_distinct(SequentialLoader(demo_store, 256, 16, seed=0))
    rsdb = mean_distinct(RsdbLoader(demo_store, 256, 16, seed=0, buffer_size=64))
    assert rsdb >= 3 * seq, (rsdb, seq)
