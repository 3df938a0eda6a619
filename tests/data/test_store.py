"""The token store: layout, attributes, and refusal of anything not committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trinity.data.store import (
    COMMIT_MARKER,
    TOKEN_CHUNK,
    StoreWriter,
    clear_stale,
    commit_dir,
    open_store,
    temp_dir_for,
)
from trinity.errors import StoreError


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
