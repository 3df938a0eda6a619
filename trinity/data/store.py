"""The token store: one phase's tokenized documents, committed atomically, in one of two formats.

Format 1, "trinity-token-store/1" (a Zarr v3 group; the held-out store and each piece of a prepare):
- `tokens`: uint32, flat; every document's tokens followed by the document-boundary token
  (`<|doc|>`, an EOS), so document i is `tokens[doc_offsets[i]:doc_offsets[i+1]]` and ends with it;
- `doc_offsets`: int64, n_docs + 1 entries, starting at 0, ending at len(tokens);
- `doc_source`: int16, n_docs entries, index into the `sources` attribute;
- optional further arrays (a prepare's pieces add `doc_address`: where the next document starts);
- attributes: `format`, `split` ("train" or "heldout"), `sources` (names, in index order),
  `tokenizer_sha256`, `doc_token`, `pad_token`, `source_tokens` and `source_documents` (name -> count),
  `source_passes` (name -> the pass over a finite source reached), and whatever the writer adds;
- `COMMITTED`: an empty marker file. A store without it does not exist: `open_store` refuses it.

Format 2, "trinity-token-store/2" (a phase's training store): `manifest.json` holds the attributes
and an ordered list of document ranges of format-1 stores beside it (`{"path", "start", "stop"}`,
paths relative to the manifest store's parent folder, never leaving it), plus its `COMMITTED`
marker. Nothing is copied: a phase of 10T tokens is the ordered union of its pieces. Opening one
checks that every piece is committed, inside the folder, and holds the range.

`open_store` opens either and returns a `TokenStore`: the same interface (attrs, tokens, doc_offsets,
doc_source, n_docs, n_tokens, sources, doc_lengths, document(i)), so loaders don't know the format.

Arrays are chunked (1 Mi tokens, 64 Ki offsets) and compressed with Blosc/zstd.

Atomic commit (`commit_dir`): the writer fills `<final>.tmp-<pid>`; then the temp directory is renamed
to its final name (an atomic rename within one filesystem) and the `COMMITTED` marker of each store in
it is written last. A process killed at any point leaves either no final directory or one without its
marker; `clear_stale` removes leftover temp directories before a rerun.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from trinity.errors import RunError, StoreError
from trinity.run.layout import fsync_path, path_inside

COMMIT_MARKER = "COMMITTED"
FORMAT = "trinity-token-store/1"
MANIFEST_FORMAT = "trinity-token-store/2"
MANIFEST_FILE = "manifest.json"
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
        self._lengths: list[np.ndarray] = []
        self._n_tokens = 0
        self._doc_source: list[np.ndarray] = []
        self.source_tokens = dict.fromkeys(self.sources, 0)
        self.source_documents = dict.fromkeys(self.sources, 0)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def add(self, source: str, ids: np.ndarray) -> None:
        """Append one document's tokens (boundary token included by the caller)."""
        ids = np.asarray(ids, dtype=np.uint32)
        self.add_many(source, ids, np.asarray([len(ids)], dtype=np.int64))

    def add_many(self, source: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents of one source at once: their tokens end to end and each one's length."""
        tokens = np.asarray(tokens, dtype=np.uint32)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens, but the lengths add up to {int(lengths.sum())}")
        self._pending.append(tokens)
        self._pending_len += len(tokens)
        self._n_tokens += len(tokens)
        self._lengths.append(lengths)
        self._doc_source.append(np.full(len(lengths), self.sources.index(source), dtype=np.int16))
        self.source_tokens[source] += len(tokens)
        self.source_documents[source] += len(lengths)
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

    def add_array(self, name: str, data: np.ndarray) -> None:
        """Store a further array beside the tokens (e.g. one row per document), chunked by rows."""
        arr = self.group.create_array(
            name,
            shape=data.shape,
            chunks=(OFFSET_CHUNK, *data.shape[1:]),
            dtype=data.dtype,
            compressors=_compressor(),
        )
        if data.size:
            arr[...] = data

    def close(self, extra_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the remaining tokens, the offsets, the source ids and the attributes (not the marker)."""
        self._flush(final=True)
        lengths = np.concatenate([np.zeros(1, dtype=np.int64), *self._lengths])
        self.add_array("doc_offsets", np.cumsum(lengths))
        self.add_array("doc_source", np.concatenate([np.zeros(0, dtype=np.int16), *self._doc_source]))
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
    """A committed store, read-only: attributes and offsets in memory, `tokens` read on first use (once)."""

    def __init__(self, path: Path, attrs: dict[str, Any], doc_offsets: np.ndarray, doc_source: np.ndarray) -> None:
        self.path = path
        self.attrs = attrs
        self.doc_offsets = doc_offsets
        self.doc_source = doc_source
        self._tokens: np.ndarray | None = None

    def _read_tokens(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def tokens(self) -> np.ndarray:
        """All tokens (uint32), loaded once."""
        if self._tokens is None:
            self._tokens = self._read_tokens()
        return self._tokens

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


class ZarrStore(TokenStore):
    """A format-1 store: the arrays of one Zarr group."""

    def __init__(self, path: Path) -> None:
        self.group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(self.group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not a {FORMAT} store (format={attrs.get('format')!r})")
        super().__init__(
            path,
            attrs,
            np.asarray(self.array("doc_offsets")[:], dtype=np.int64),
            np.asarray(self.array("doc_source")[:], dtype=np.int16),
        )

    def array(self, name: str) -> Any:
        """One of the group's arrays (zarr.Array), read lazily."""
        try:
            arr = self.group[name]
        except KeyError as exc:
            raise StoreError(f"{self.path} has no array {name!r}") from exc
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{self.path}/{name} is not an array")
        return arr

    def _read_tokens(self) -> np.ndarray:
        return np.asarray(self.array("tokens")[:], dtype=np.uint32)

    def read_tokens(self, start_doc: int, stop_doc: int) -> np.ndarray:
        """The tokens of documents [start_doc, stop_doc), read without loading the rest."""
        lo, hi = int(self.doc_offsets[start_doc]), int(self.doc_offsets[stop_doc])
        if self._tokens is not None:
            return self._tokens[lo:hi]
        return np.asarray(self.array("tokens")[lo:hi], dtype=np.uint32)


class ManifestStore(TokenStore):
    """A format-2 store: document ranges of format-1 stores, in order, read where they lie."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        attrs = dict(manifest["attrs"])
        attrs["format"] = MANIFEST_FORMAT
        names = list(attrs["sources"])
        root = path.parent
        self.parts: list[tuple[ZarrStore, int, int]] = []
        offsets = [np.zeros(1, dtype=np.int64)]
        doc_source = []
        total = 0
        for ref in manifest["pieces"]:
            rel, start, stop = str(ref["path"]), int(ref["start"]), int(ref["stop"])
            try:
                piece_path = path_inside(root, rel)
            except RunError as exc:
                raise StoreError(f"{path}: piece {rel!r} is not inside {root}: {exc}") from exc
            if not is_committed(piece_path):
                raise StoreError(f"{path}: piece {piece_path} is missing or not committed; run the prepare node again")
            piece = ZarrStore(piece_path)
            if not 0 <= start <= stop <= piece.n_docs:
                raise StoreError(f"{path}: piece {piece_path} has {piece.n_docs} documents, not [{start}, {stop})")
            self.parts.append((piece, start, stop))
            local = piece.doc_offsets[start : stop + 1]
            offsets.append(local[1:] - local[0] + total)
            total += int(local[-1] - local[0])
            index = np.asarray([names.index(n) for n in piece.sources], dtype=np.int16)
            doc_source.append(index[piece.doc_source[start:stop]])
        super().__init__(
            path, attrs, np.concatenate(offsets), np.concatenate([np.zeros(0, dtype=np.int16), *doc_source])
        )

    def _read_tokens(self) -> np.ndarray:
        parts = [piece.read_tokens(start, stop) for piece, start, stop in self.parts]
        return np.concatenate([np.zeros(0, dtype=np.uint32), *parts])


def write_manifest(path: Path | str, attrs: dict[str, Any], pieces: Sequence[tuple[str, int, int]]) -> None:
    """Write a format-2 store (not its marker) at `path`: `attrs` and (path, start, stop) document ranges
    of committed format-1 stores, paths relative to `path`'s parent folder."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "attrs": {**attrs, "format": MANIFEST_FORMAT},
        "pieces": [{"path": rel, "start": start, "stop": stop} for rel, start, stop in pieces],
    }
    (p / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def is_committed(path: Path | str) -> bool:
    return (Path(path) / COMMIT_MARKER).is_file()


def open_store(path: Path | str) -> TokenStore:
    """Open a committed token store of either format; refuse a missing or unfinished one with what to do next."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"no token store at {p}; run the prepare node of this phase")
    if not is_committed(p):
        raise StoreError(
            f"token store {p} is unfinished (no {COMMIT_MARKER} marker): its writer was interrupted; "
            "run the prepare node again"
        )
    if (p / MANIFEST_FILE).is_file():
        manifest = json.loads((p / MANIFEST_FILE).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise StoreError(f"{p} is not a {MANIFEST_FORMAT} store (format={manifest.get('format')!r})")
        return ManifestStore(p, manifest)
    return ZarrStore(p)


def open_piece(path: Path | str) -> ZarrStore:
    """Open a committed format-1 store (a prepare's piece), with access to its further arrays."""
    store = open_store(path)
    if not isinstance(store, ZarrStore):
        raise StoreError(f"{path} is a {MANIFEST_FORMAT} store, not a piece")
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
        fsync_path(marker)
