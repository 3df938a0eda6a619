"""The files of a source: listed with fsspec, opened, decompressed and split into lines, and checked.

The low level under `trinity.data.sources`: globs and URLs expanded into sorted `SourceFile`s (bounded by
MAX_FILES), byte-range line splitting for plain files, streaming decompression that notices a truncated
stream, a fast JSON line parser, and the Parquet schema checks. Every failure is a SourceError that names
the file and the reason.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from trinity.errors import SourceError
from trinity.spec.data import MAX_FILES, ParquetSource

BLOCK_BYTES = 4 << 20
"""Bytes read (or decompressed) at a time: large blocks keep per-read overhead far below tokenizing."""
MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}
"""The first bytes of a compressed file of each kind."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a pass: its display name (a path, or a URL when given as one), filesystem and size."""

    name: str
    fs: AbstractFileSystem
    path: str
    size: int

    @property
    def compression(self) -> str | None:
        """`gzip`, `zstd` or None, from the file name."""
        lower = self.name.lower()
        if lower.endswith(".gz"):
            return "gzip"
        if lower.endswith((".zst", ".zstd")):
            return "zstd"
        return None

    def open(self) -> IO[bytes]:
        opened: IO[bytes] = self.fs.open(self.path, "rb")
        return opened


def _filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """fsspec's filesystem and path of a URL; a scheme whose package is missing is a clear SourceError."""
    try:
        return url_to_fs(url)  # type: ignore[no-any-return]
    except ImportError as e:
        from fsspec.registry import known_implementations

        scheme = url.split("://", 1)[0]
        package = str(known_implementations.get(scheme, {}).get("class", scheme)).split(".")[0]
        raise SourceError(f"{url}: reading {scheme}:// needs the {package} package (pip install {package})") from e
    except ValueError as e:
        raise SourceError(f"{url}: {e}") from e


def _hidden(match: str, pattern: str) -> bool:
    """Whether a wildcard matched a dot-file or dot-folder the pattern does not name (glob's own rule)."""
    named = set(pattern.split("/"))
    return any(part.startswith(".") and part not in named for part in match.split("/"))


def list_files(patterns: tuple[str, ...], base_dir: Path) -> list[SourceFile]:
    """The files matching the patterns (relative plain paths under base_dir), sorted, without duplicates."""
    found: dict[str, SourceFile] = {}
    for pattern in patterns:
        is_url = "://" in pattern
        full = pattern if is_url or Path(pattern).is_absolute() else str(Path(base_dir) / pattern)
        fs, fs_pattern = _filesystem(full)
        try:
            matches = fs.glob(fs_pattern, detail=True)
        except OSError as e:
            raise SourceError(f"{pattern}: cannot list ({e})") from e
        matched = 0
        for path, info in matches.items():
            if info.get("type") != "file" or _hidden(path, fs_pattern):
                continue
            matched += 1
            name = fs.unstrip_protocol(path) if is_url else path
            found.setdefault(name, SourceFile(name, fs, path, int(info.get("size") or 0)))
            if len(found) > MAX_FILES:
                raise SourceError(f"{pattern}: the source matches more than {MAX_FILES:,} files; split it")
        if matched == 0:
            raise SourceError(f"path pattern {pattern!r} (under {base_dir}) matches no file")
    return [found[name] for name in sorted(found, key=lambda n: n.split("/"))]


@contextmanager
def reading(file: SourceFile) -> Iterator[None]:
    """Turn any failure to read `file` into a SourceError naming it and the reason."""
    import pyarrow as pa
    import zstandard

    try:
        yield
    except SourceError:
        raise
    except FileNotFoundError as e:
        raise SourceError(f"{file.name}: no such file") from e
    except gzip.BadGzipFile as e:
        raise SourceError(f"{file.name}: not a gzip file ({e})") from e
    except EOFError as e:
        raise SourceError(f"{file.name}: truncated ({e})") from e
    except (OSError, ValueError, pa.ArrowException, zstandard.ZstdError) as e:
        raise SourceError(f"{file.name}: {type(e).__name__}: {e}") from e


def decompressed(file: SourceFile, raw: IO[bytes], block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The file's bytes in blocks, decompressed per its name; a truncated stream is a SourceError."""
    kind = file.compression
    if kind == "gzip":
        with gzip.GzipFile(fileobj=raw) as g:
            while block := g.read(block_bytes):
                yield block
    elif kind == "zstd":
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        obj, in_frame = dctx.decompressobj(), False
        while data := raw.read(max(1, block_bytes // 4)):
            while data:  # a file may hold several frames (pzstd, concatenated files)
                in_frame = True
                if out := obj.decompress(data):
                    yield out
                data = b""
                if obj.eof:
                    data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
        if in_frame:
            raise SourceError(f"{file.name}: truncated zstd stream (the last frame does not end)")
    else:
        while block := raw.read(block_bytes):
            yield block


def lines_in_range(raw: IO[bytes], lo: int, hi: int | None) -> Iterator[tuple[bytes, int]]:
    """The lines of a plain file that start in [lo, hi) (hi None: to the end), each (without its newline)
    with the byte offset just after it: standard byte-range splitting, a line belongs where it starts."""
    pos, buf = lo, b""
    if lo > 0:  # the first line starting at or after lo follows the first newline at or after lo - 1
        raw.seek(lo - 1)
        pos = lo - 1
        while True:
            block = raw.read(BLOCK_BYTES if hi is None else min(BLOCK_BYTES, hi - pos + 65536))
            if not block:
                return
            i = block.find(b"\n")
            if i >= 0:
                pos, buf = pos + i + 1, block[i + 1 :]
                break
            pos += len(block)
    while True:
        lines = buf.split(b"\n")
        buf = lines.pop()
        for line in lines:
            if hi is not None and pos >= hi:
                return
            pos += len(line) + 1
            yield line, pos
        if hi is not None and pos >= hi:
            return
        block = raw.read(BLOCK_BYTES if hi is None else min(BLOCK_BYTES, hi - pos + 65536))
        if not block:
            if buf:
                yield buf, pos + len(buf)
            return
        buf += block


def stream_lines(blocks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """The lines of a stream of blocks, each with whether it is the stream's last line."""
    buf, pending = b"", None
    for block in blocks:
        lines = (buf + block).split(b"\n")
        buf = lines.pop()
        for line in lines:
            if pending is not None:
                yield pending, False
            pending = line
    if buf:
        if pending is not None:
            yield pending, False
        yield buf, True
    elif pending is not None:
        yield pending, True


def parse_line(line: bytes) -> Any:
    """A JSON line's value; None for a blank line. orjson first (fast); json for what only it accepts (NaN)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        if not line.strip():
            return None
        return json.loads(line)


def check_parquet_schema(file: SourceFile, schema: Any, source: ParquetSource) -> None:
    """The Parquet schema has the text column, a string column, and the filter's columns and types."""
    import pyarrow as pa

    names = ", ".join(schema.names)
    for column in (source.text_column, *(term.column for term in source.filter)):
        if column not in schema.names:
            raise SourceError(f"{file.name}: no column {column!r} (columns: {names})")
    kind = schema.field(source.text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise SourceError(f"{file.name}: column {source.text_column!r} is {kind}, not a string column")
    if source.filter:
        try:
            schema.empty_table().filter(filter_expression(source))
        except (pa.ArrowException, TypeError) as e:
            raise SourceError(f"{file.name}: the filter does not apply to its columns ({e})") from e


def filter_expression(source: ParquetSource) -> Any:
    import pyarrow.parquet as pq

    terms = [(t.column, t.op, list(t.value) if isinstance(t.value, tuple) else t.value) for t in source.filter]
    return pq.filters_to_expression(terms)
