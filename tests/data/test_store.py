"""The token store: layout, attributes, refusal of anything not committed, and the manifest format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trinity.data.loaders import build_loader
from trinity.data.store import (
    COMMIT_MARKER,
    TOKEN_CHUNK,
    ManifestStore,
    StoreWriter,
    clear_stale,
    commit_dir,
    open_store,
    temp_dir_for,
    write_manifest,
)
from trinity.errors import StoreError
from trinity.spec import data as data_spec


def test_write_commit_read_back(tmp_path: Path) -> None:
    final = tmp_path / "store"
    tmp = temp_dir_for(final)
    writer = StoreWriter(tmp, ["a", "b"], {"tokenizer_sha256": "abc"})
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 2**20, size=n).astype(np.uint32) for n in (5, TOKEN_CHUNK + 3, 1, 700)]
    for i, d in enumerate(docs):
        writer.add("ab"[i % 2], d)
    writer.close()
    with pytest.raises(StoreError, match="no token store"):
        open_store(final)
    commit_dir(tmp, final)
    store = open_store(final)
    np.testing.assert_array_equal(store.tokens, np.concatenate(docs))
    assert store.doc_offsets.tolist() == [0, 5, TOKEN_CHUNK + 8, TOKEN_CHUNK + 9, TOKEN_CHUNK + 709]
    assert store.doc_source.tolist() == [0, 1, 0, 1]
    assert store.attrs["tokenizer_sha256"] == "abc"
    assert store.attrs["source_documents"] == {"a": 2, "b": 2}
    assert store.attrs["source_tokens"]["b"] == TOKEN_CHUNK + 3 + 700
    np.testing.assert_array_equal(store.document(3), docs[3])


def test_unmarked_store_is_refused(tmp_path: Path) -> None:
    final = tmp_path / "store"
    writer = StoreWriter(final, ["a"])
    writer.add("a", np.arange(3))
    writer.close()
    with pytest.raises(StoreError, match="unfinished"):
        open_store(final)
    (final / COMMIT_MARKER).write_text("")
    assert open_store(final).n_tokens == 3


def test_clear_stale_and_replace(tmp_path: Path) -> None:
    final = tmp_path / "store"
    (tmp_path / "store.tmp-99999").mkdir()
    assert [p.name for p in clear_stale(final)] == ["store.tmp-99999"]
    for n in (3, 4):
        tmp = temp_dir_for(final)
        w = StoreWriter(tmp, ["a"])
        w.add("a", np.arange(n))
        w.close()
        commit_dir(tmp, final)
        assert open_store(final).n_tokens == n


def _piece(path: Path, source: str, lengths: list[int], seed: int) -> list[np.ndarray]:
    """A committed format-1 store of random documents of one source; returns the documents."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 1000, size=n).astype(np.uint32) for n in lengths]
    tmp = temp_dir_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = StoreWriter(tmp, [source])
    for d in docs:
        w.add(source, d)
    w.close()
    commit_dir(tmp, path)
    return docs


def _manifest(root: Path, refs: list[tuple[str, int, int]]) -> Path:
    tmp = temp_dir_for(root / "train")
    write_manifest(tmp, {"split": "train", "sources": ["a", "b"], "doc_token": 0}, refs)
    commit_dir(tmp, root / "train")
    return root / "train"


def test_manifest_store_reads_like_a_plain_one(tmp_path: Path) -> None:
    """Document ranges of pieces, by reference, equal a plain store holding those documents: same arrays,
    same documents, and a loader over either yields the same batches."""
    a1 = _piece(tmp_path / "pieces/a/1", "a", [5, 300, 17, 40], seed=1)
    a2 = _piece(tmp_path / "pieces/a/2", "a", [60, 2, 90], seed=2)
    b1 = _piece(tmp_path / "pieces/b/1", "b", [33, 70, 250, 8, 11], seed=3)
    refs = [("pieces/a/1", 1, 4), ("pieces/a/2", 0, 2), ("pieces/b/1", 0, 3)]
    manifest = open_store(_manifest(tmp_path, refs))
    assert isinstance(manifest, ManifestStore)
    docs = [("a", d) for d in a1[1:4] + a2[0:2]] + [("b", d) for d in b1[0:3]]
    tmp = temp_dir_for(tmp_path / "plain")
    w = StoreWriter(tmp, ["a", "b"])
    for source, d in docs:
        w.add(source, d)
    w.close()
    commit_dir(tmp, tmp_path / "plain")
    plain = open_store(tmp_path / "plain")
    np.testing.assert_array_equal(manifest.tokens, np.concatenate([d for _, d in docs]))
    for name in ("tokens", "doc_offsets", "doc_source", "doc_lengths"):
        np.testing.assert_array_equal(getattr(manifest, name), getattr(plain, name))
    assert (manifest.n_docs, manifest.n_tokens, manifest.sources) == (plain.n_docs, plain.n_tokens, plain.sources)
    np.testing.assert_array_equal(manifest.document(4), a2[1])
    assert manifest.attrs["format"] == "trinity-token-store/2"
    for kind in (data_spec.RsdbLoader(buffer_size=4), data_spec.SequentialLoader()):
        one, two = (build_loader(kind, s, 32, 2, seed=5) for s in (manifest, plain))
        for _ in range(20):
            x, y = one.next_batch(), two.next_batch()
            assert torch.equal(x.tokens_BT, y.tokens_BT) and torch.equal(x.doc_ids_BT, y.doc_ids_BT)


def test_manifest_store_refuses_missing_unfinished_and_outside_pieces(tmp_path: Path) -> None:
    root = tmp_path / "out"
    _piece(root / "pieces/a/1", "a", [5, 6], seed=1)
    _piece(tmp_path / "elsewhere", "a", [5, 6], seed=1)
    (root / "pieces/a/link").symlink_to(tmp_path / "elsewhere")
    cases = {
        "pieces/a/2": "missing or not committed",
        "../elsewhere": "not inside",
        str(tmp_path / "elsewhere"): "not inside",
        "pieces/a/link": "not inside",
    }
    for rel, message in cases.items():
        with pytest.raises(StoreError, match=message):
            open_store(_manifest(root, [("pieces/a/1", 0, 2), (rel, 0, 1)]))
    (root / "pieces/a/1" / COMMIT_MARKER).unlink()
    with pytest.raises(StoreError, match=r"pieces/a/1 is missing or not committed"):
        open_store(_manifest(root, [("pieces/a/1", 0, 2)]))
    (root / "pieces/a/1" / COMMIT_MARKER).write_text("")
    with pytest.raises(StoreError, match=r"has 2 documents, not \[0, 3\)"):
        open_store(_manifest(root, [("pieces/a/1", 0, 3)]))
    assert open_store(_manifest(root, [("pieces/a/1", 1, 2)])).n_tokens == 6
