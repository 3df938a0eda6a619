"""The token store: one phase's tokenized documents in a Zarr v3 group, committed atomically.

Layout of a store directory (a Zarr v3 group):
- `tokens`: uint32, flat; every document's tokens followed by the document-boundary token
  (`<|doc|>`, an EOS), so document i is `tokens[doc_offsets[i]:doc_offsets[i+1]]` and ends with it;
- `doc_offsets`: int64, n_docs + 1 entries, starting at 0, ending at len(tokens);
- `doc_source`: int16, n_docs entries, index into the `sources` attribute;
- attributes: `format` ("trinity-token-store/1"), `split` ("train" or "heldout"), `sources` (names,
  in index order), `tokenizer_sha256`, `doc_token`, `pad_token`, `source_tokens` and `source_documents`
  (name -> count), `source_passes` (name -> how many passes over a finite source were needed), and
  whatever the writer adds;
- `COMMITTED`: an empty marker file. A store without it does not exist: `open_store` refuses it.

Arrays are chunked (1 Mi tokens, 64 Ki offsets) and compressed with Blosc/zstd.

Atomic commit (`commit_dir`): the writer fills `<final>.tmp-<pid>`; then the temp directory is renamed
to its final name (an atomic rename within one filesystem) and the `COMMITTED` marker of each store in
it is written last. A process killed at any point leaves either no final directory or one without its
marker; `clear_stale` removes leftover temp directories before a rerun.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from trinity.errors import StoreError

COMMIT_MARKER = "COMMITTED"
FORMAT = "trinity-token-store/1"
TOKEN_CHUNK = 1 << 20
OFFSET_CHUNK = 1 << 16


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


class StoreWriter:
    """Appends whole documents to a new store directory; `close` writes offsets, sources and attributes."""

    def __init__(self, path: Path | str, sources: list[str], attrs: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.sources = list(sources)
        self.group = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        self.tokens = self.group.create_array(
            "tokens", shape=(0,), chunks=(TOKEN_CHUNK,), dtype="uint32", compressors=_compressor()
        )
        self.attrs = dict(attrs or {})
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._offsets: list[int] = [0]
        self._doc_source: list[int] = []
        self.source_tokens = dict.fromkeys(self.sources, 0)
        self.source_documents = dict.fromkeys(self.sources, 0)

    @property
    def n_tokens(self) -> int:
        return self._offsets[-1]

    def add(self, source: str, ids: np.ndarray) -> None:
        """Append one document's tokens (boundary token included by the caller)."""
        ids = np.asarray(ids, dtype=np.uint32)
        self._pending.append(ids)
        self._pending_len += len(ids)
        self._offsets.append(self._offsets[-1] + len(ids))
        self._doc_source.append(self.sources.index(source))
        self.source_tokens[source] += len(ids)
        self.source_documents[source] += 1
        if self._pending_len >= TOKEN_CHUNK:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending)
        # Append whole chunks only (no read-modify-write of a partial chunk), the tail at the end.
        cut = len(data) if final else (len(data) // TOKEN_CHUNK) * TOKEN_CHUNK
        if cut:
            self.tokens.append(data[:cut])
        rest = data[cut:]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)

    def close(self, extra_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the remaining tokens, the offsets, the source ids and the attributes (not the marker)."""
        self._flush(final=True)
        offsets = np.asarray(self._offsets, dtype=np.int64)
        doc_source = np.asarray(self._doc_source, dtype=np.int16)
        for name, data in (("doc_offsets", offsets), ("doc_source", doc_source)):
            arr = self.group.create_array(
                name, shape=data.shape, chunks=(OFFSET_CHUNK,), dtype=data.dtype, compressors=_compressor()
            )
            if len(data):
                arr[:] = data
        attrs = {
            "format": FORMAT,
            "sources": self.sources,
            "source_tokens": self.source_tokens,
            "source_documents": self.source_documents,
            **self.attrs,
            **(extra_attrs or {}),
        }
        self.group.attrs.update(attrs)
        return attrs


class TokenStore:
    """A committed store, read-only. `tokens` is read into memory on first use (one array per process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.group = zarr.open_group(str(path), mode="r", zarr_format=3)
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        self.doc_offsets: np.ndarray = np.asarray(self._array("doc_offsets")[:], dtype=np.int64)
        self.doc_source: np.ndarray = np.asarray(self._array("doc_source")[:], dtype=np.int16)
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """All tokens (uint32), loaded once."""
        if self._tokens is None:
            self._tokens = np.asarray(self._array("tokens")[:], dtype=np.uint32)
        return self._tokens

    def _array(self, name: str) -> Any:
        arr = self.group[name]
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{self.path}/{name} is not an array")
        return arr

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def sources(self) -> list[str]:
        return list(self.attrs["sources"])

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (its boundary token last)."""
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]


def is_committed(path: Path | str) -> bool:
    return (Path(path) / COMMIT_MARKER).is_file()


def open_store(path: Path | str) -> TokenStore:
    """Open a committed token store; refuse a missing or unfinished one with what to do next."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"no token store at {p}; run the prepare node of this phase")
    if not is_committed(p):
        raise StoreError(
            f"token store {p} is unfinished (no {COMMIT_MARKER} marker): its writer was interrupted; "
            "run the prepare node again"
        )
    store = TokenStore(p)
    if store.attrs.get("format") != FORMAT:
        raise StoreError(f"{p} is not a {FORMAT} store (format={store.attrs.get('format')!r})")
    return store


def temp_dir_for(final: Path | str) -> Path:
    """Where a writer of `final` builds its output: `<final>.tmp-<pid>` beside it."""
    f = Path(final)
    return f.with_name(f"{f.name}.tmp-{os.getpid()}")


def clear_stale(final: Path | str) -> list[Path]:
    """Remove temp (and half-replaced old) directories left by killed writers of `final`."""
    f = Path(final)
    removed = []
    if f.parent.exists():
        removed = sorted([*f.parent.glob(f"{f.name}.tmp-*"), *f.parent.glob(f"{f.name}.old-*")])
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def commit_dir(tmp: Path | str, final: Path | str, stores: Iterable[str] = (".",)) -> None:
    """Rename the finished temp directory to `final`, then write each store's marker (last)."""
    t, f = Path(tmp), Path(final)
    if f.exists():
        old = f.with_name(f"{f.name}.old-{os.getpid()}")
        f.rename(old)
        shutil.rmtree(old)
    t.rename(f)
    for rel in stores:
        marker = f / rel / COMMIT_MARKER
        marker.write_text("")
        fd = os.open(marker, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
