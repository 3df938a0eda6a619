"""Reading documents from a `data.sources` entry: one pass over a source, cut into pieces, streaming.

A pass over a source visits its files in a fixed order (each pattern expanded with fsspec, all sorted,
without duplicates), and every document in a file has an `Address` (file index, offset) that orders it:
- `jsonl`: one JSON object per line, plain or compressed (`.gz`, `.zst`, inferred from the name); each
  line's `text_field` is a document (blank lines, lines without it or with an empty one are skipped; a
  malformed line is an error naming file and line). Offset: the byte offset of the line (plain), the line
  index (compressed: a compressed stream cannot be entered in the middle).
- `parquet`: each row of the string column `text_column` that passes `filter` (null and empty rows are
  skipped). Offset: the row index in the file (rows the filter drops count).
- `files`: each file of at most `max_bytes` is one document, decoded as UTF-8 with replacement characters
  for invalid bytes. Offset: 0.
- `demo`: the built-in corpus (`trinity.data.demo`), in the order its own `seed` fixes. Offset: the item
  index (a stdlib file that makes no document still counts; math: one item per worksheet).

`SourceReader.pieces` cuts a pass, from any address, into contiguous `Piece`s of about `piece_bytes` of
text (plain JSONL at byte offsets, a piece holding the lines that start in it; Parquet at row groups;
compressed files whole), and `SourceReader.read` yields a piece's documents, each with the address just
after it, so a consumer that stops anywhere knows where to continue. Reading the pieces one after the
other gives exactly the documents of `iter_documents`, whatever `piece_bytes` (tests/data/test_sources.py).

Paths are local (relative to `base_dir`, the graph file's folder) or fsspec URLs (`file://`, `s3://`,
`gs://`; the scheme's package must be installed). A pattern matching nothing is an error: a typo should
not silently train on nothing. `check` opens every file before any work is committed; a file that turns
out corrupt later (a truncated gzip) fails `read` with its path and the reason, never a short file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from trinity.data.demo import demo_items, stdlib_files
from trinity.data.source_files import (
    MAGIC,
    SourceFile,
    check_parquet_schema,
    decompressed,
    filter_expression,
    lines_in_range,
    list_files,
    parse_line,
    reading,
    stream_lines,
)
from trinity.errors import SourceError
from trinity.spec.data import DemoSource, FilesSource, JsonlSource, ParquetSource, Source

DEMO_PIECE_DOCUMENTS = 256
"""Items (documents) in one piece of a demo source."""


@dataclass(frozen=True, order=True)
class Address:
    """Where a document starts in one pass over a source (ordered as tuples)."""

    file: int
    """Index in the source's sorted file list (0 for demo)."""
    offset: int
    """Plain jsonl: byte offset of its line; compressed jsonl: line index in the file; parquet: row index
    in the file (rows the filter drops count); files: 0; demo: item index."""


@dataclass(frozen=True)
class Piece:
    """The documents whose address is in [start, stop): the unit the prepare tokenizes and commits."""

    start: Address
    stop: Address
    est_bytes: int
    """Estimated text bytes in it (0: unknown; a compressed file counts its compressed size)."""
    est_documents: int
    """Estimated documents in it (0: unknown)."""


class SourceReader:
    """One pass over a source: its files (expanded once), its pieces, and each piece's documents."""

    def __init__(self, source: Source, base_dir: Path | str) -> None:
        self.source = source
        self._files = [] if isinstance(source, DemoSource) else list_files(source.paths, Path(base_dir))
        self.files: list[str] = [f.name for f in self._files]
        """The pass's files, sorted (URLs or paths); [] for demo."""

    @cached_property
    def end(self) -> Address | None:
        """The address just past the pass; None: endless (demo math without max_documents)."""
        source = self.source
        if not isinstance(source, DemoSource):
            return Address(len(self._files), 0)
        if source.corpus == "math":
            return None if source.max_documents is None else Address(0, source.max_documents)
        items = len(stdlib_files())
        if source.max_documents is None:
            return Address(0, items)
        documents = 0
        for i, doc in enumerate(demo_items(source.corpus, source.seed)):
            documents += doc is not None
            if documents == source.max_documents:
                return Address(0, i + 1)
        return Address(0, items)

    # --- checking ---------------------------------------------------------------------------------------

    def check(self) -> None:
        """Every file exists, opens and has the declared format; else SourceError('<path>: <reason>')."""
        for file in self._files:
            with reading(file):
                if isinstance(self.source, JsonlSource):
                    self._check_jsonl(file)
                elif isinstance(self.source, ParquetSource):
                    self._check_parquet(file, self.source)
                else:
                    with file.open() as raw:
                        raw.read(1)

    def _check_jsonl(self, file: SourceFile) -> None:
        with file.open() as raw:
            kind = file.compression
            if kind is not None and raw.read(len(MAGIC[kind])) != MAGIC[kind]:
                raise SourceError(f"{file.name}: not a {kind} file (bad magic)")
            raw.seek(0)
            for line, _ in stream_lines(decompressed(file, raw, 1 << 16)):  # the head only
                try:
                    if parse_line(line) is not None:
                        return
                except ValueError as e:
                    raise SourceError(f"{file.name}: the first line is not JSON ({e})") from e

    def _check_parquet(self, file: SourceFile, source: ParquetSource) -> None:
        import pyarrow.parquet as pq

        with file.open() as raw:
            check_parquet_schema(file, pq.ParquetFile(raw).schema_arrow, source)

    # --- cutting into pieces ----------------------------------------------------------------------------

    def pieces(self, start: Address, piece_bytes: int) -> Iterator[Piece]:
        """The pieces from `start` to the end of the pass, in order and contiguous, each about `piece_bytes`
        of text: plain JSONL cut at any byte, Parquet at row groups, compressed files and `files` whole."""
        if piece_bytes < 1:
            raise ValueError(f"piece_bytes must be positive, got {piece_bytes}")
        if isinstance(self.source, DemoSource):
            yield from self._demo_pieces(start)
            return
        end = Address(len(self._files), 0)
        cur, acc_bytes, acc_docs = start, 0, 0
        for f in range(start.file, len(self._files)):
            file = self._files[f]
            lo = start.offset if f == start.file else 0
            if isinstance(self.source, JsonlSource) and file.compression is None:
                pos = min(lo, file.size)
                while pos + piece_bytes - acc_bytes < file.size:  # cut inside the file
                    pos += piece_bytes - acc_bytes
                    yield Piece(cur, Address(f, pos), piece_bytes, acc_docs)
                    cur, acc_bytes, acc_docs = Address(f, pos), 0, 0
                acc_bytes += file.size - pos
            elif isinstance(self.source, ParquetSource):
                for stop, n_bytes, n_rows in self._row_groups(f, lo):
                    acc_bytes, acc_docs = acc_bytes + n_bytes, acc_docs + n_rows
                    if acc_bytes >= piece_bytes and stop < end:
                        yield Piece(cur, stop, acc_bytes, acc_docs)
                        cur, acc_bytes, acc_docs = stop, 0, 0
                continue
            elif isinstance(self.source, FilesSource):
                whole = file.size <= self.source.max_bytes
                acc_bytes, acc_docs = acc_bytes + (file.size if whole else 0), acc_docs + whole
            else:  # compressed JSONL: one piece to the end of the file, never cut
                acc_bytes += file.size
            stop = Address(f + 1, 0)
            if acc_bytes >= piece_bytes and stop < end:
                yield Piece(cur, stop, acc_bytes, acc_docs)
                cur, acc_bytes, acc_docs = stop, 0, 0
        if cur < end:
            yield Piece(cur, end, acc_bytes, acc_docs)

    def _row_groups(self, f: int, lo: int) -> Iterator[tuple[Address, int, int]]:
        """For each row group of Parquet file f from row lo: where it ends, its text bytes, its rows."""
        assert isinstance(self.source, ParquetSource)
        meta = self._parquet_metadata(f)
        leaves = meta.row_group(0).num_columns if meta.num_row_groups else 0
        paths = [meta.row_group(0).column(i).path_in_schema for i in range(leaves)]
        column = paths.index(self.source.text_column) if self.source.text_column in paths else -1
        first = 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            rows = group.num_rows
            last = first + rows
            if last > lo and rows > 0:
                taken = last - max(lo, first)
                n_bytes = group.column(column).total_uncompressed_size if column >= 0 else 0
                stop = Address(f, last) if g + 1 < meta.num_row_groups else Address(f + 1, 0)
                yield stop, n_bytes * taken // rows, taken
            first = last
        if meta.num_rows <= lo or meta.num_row_groups == 0:
            yield Address(f + 1, 0), 0, 0

    def _parquet_metadata(self, f: int) -> Any:
        import pyarrow.parquet as pq

        file = self._files[f]
        with reading(file), file.open() as raw:
            return pq.ParquetFile(raw).metadata

    def _demo_pieces(self, start: Address) -> Iterator[Piece]:
        end = self.end
        first = start.offset
        while end is None or first < end.offset:
            last = first + DEMO_PIECE_DOCUMENTS if end is None else min(first + DEMO_PIECE_DOCUMENTS, end.offset)
            yield Piece(Address(0, first), Address(0, last), 0, last - first)
            first = last

    # --- reading ----------------------------------------------------------------------------------------

    def read(self, piece: Piece) -> Iterator[tuple[str, Address]]:
        """Each document of the piece, in order: (its text, the address just after it)."""
        source = self.source
        if isinstance(source, DemoSource):
            items = demo_items(source.corpus, source.seed, piece.start.offset)
            for i, doc in zip(range(piece.start.offset, piece.stop.offset), items, strict=False):
                if doc is not None:
                    yield doc, Address(0, i + 1)
            return
        for f in range(piece.start.file, min(piece.stop.file + 1, len(self._files))):
            lo = piece.start.offset if f == piece.start.file else 0
            hi = piece.stop.offset if f == piece.stop.file else None
            if hi is not None and hi <= lo:
                continue
            file = self._files[f]
            with reading(file):
                if isinstance(source, JsonlSource):
                    yield from self._read_jsonl(f, file, source, lo, hi)
                elif isinstance(source, ParquetSource):
                    yield from self._read_parquet(f, file, source, lo, hi)
                elif file.size <= source.max_bytes:
                    with file.open() as raw:
                        text = raw.read().decode("utf-8", errors="replace")
                    if text:
                        yield text, Address(f + 1, 0)

    def _read_jsonl(
        self, f: int, file: SourceFile, source: JsonlSource, lo: int, hi: int | None
    ) -> Iterator[tuple[str, Address]]:
        field = source.text_field
        with file.open() as raw:
            if file.compression is None:
                for line, after in lines_in_range(raw, lo, hi):
                    text = self._document(line, file, after - len(line) - 1, field)
                    if text:
                        yield text, Address(f, after) if after < file.size else Address(f + 1, 0)
                return
            for index, (line, last) in enumerate(stream_lines(decompressed(file, raw))):
                if index < lo:
                    continue
                if hi is not None and index >= hi:
                    return
                text = self._document(line, file, -index - 1, field)
                if text:
                    yield text, Address(f + 1, 0) if last else Address(f, index + 1)

    def _document(self, line: bytes, file: SourceFile, where: int, field: str) -> str | None:
        """The text of one JSON line; `where` is its byte offset (>= 0) or -(line number) (compressed)."""
        try:
            record = parse_line(line)
        except (ValueError, UnicodeDecodeError) as e:
            lineno = -where if where < 0 else self._line_number(file, where)
            raise SourceError(f"{file.name}:{lineno}: not a JSON object ({e})") from e
        text = record.get(field) if type(record) is dict else None
        return text if type(text) is str else None

    @staticmethod
    def _line_number(file: SourceFile, offset: int) -> int:
        """The 1-based number of the plain-file line at byte `offset` (only on the error path: it rereads)."""
        with file.open() as raw:
            return raw.read(offset).count(b"\n") + 1

    def _read_parquet(
        self, f: int, file: SourceFile, source: ParquetSource, lo: int, hi: int | None
    ) -> Iterator[tuple[str, Address]]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys([source.text_column, *(term.column for term in source.filter)]))
        expression = filter_expression(source) if source.filter else None
        with file.open() as raw:
            pf = pq.ParquetFile(raw if not isinstance(file.fs, LocalFileSystem) else file.path)
            check_parquet_schema(file, pf.schema_arrow, source)
            meta = pf.metadata
            n_rows = meta.num_rows
            hi = n_rows if hi is None else min(hi, n_rows)
            first = 0
            for g in range(meta.num_row_groups):
                group_first, first = first, first + meta.row_group(g).num_rows
                if first <= lo or group_first >= hi:
                    continue
                row = group_first
                for batch in pf.iter_batches(batch_size=8192, row_groups=[g], columns=columns):
                    b_first, row = row, row + batch.num_rows
                    a, b = max(lo, b_first), min(hi, row)
                    if a >= b:
                        continue
                    table = pa.Table.from_batches([batch.slice(a - b_first, b - a)])
                    rows: Any = range(a, b)
                    if expression is not None:
                        table = table.append_column("__trinity_row__", pa.array(np.arange(a, b))).filter(expression)
                        rows = table.column("__trinity_row__").to_numpy().tolist()
                    for text, r in zip(table.column(source.text_column).to_pylist(), rows, strict=True):
                        if type(text) is str and text:
                            yield text, Address(f, r + 1) if r + 1 < n_rows else Address(f + 1, 0)


def iter_documents(source: Source, base_dir: Path | str = ".") -> Iterator[str]:
    """Each document's text of one source, streaming, in a deterministic order (one whole pass)."""
    if isinstance(source, DemoSource):
        from trinity.data.demo import iter_demo

        yield from iter_demo(source.corpus, source.seed, source.max_documents)
        return
    reader = SourceReader(source, base_dir)
    for piece in reader.pieces(Address(0, 0), 1 << 62):
        for text, _ in reader.read(piece):
            yield text
