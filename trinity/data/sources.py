"""Reading documents from a `data.sources` entry, streaming: one document (or one Parquet batch) at a time.

`iter_documents(source, base_dir)` yields each document's text, in a deterministic order:
- `jsonl`: globs expanded and sorted, then line by line; each line's `text_field` (lines without it,
  or blank lines, are skipped; a malformed line is an error naming file and line).
- `parquet`: globs expanded and sorted, then record batches of `text_column` (null rows skipped).
- `files`: globs (`**` allowed) expanded and sorted; each file of at most `max_bytes` is one document,
  decoded as UTF-8 with replacement characters for invalid bytes.
- `demo`: the built-in corpus (`trinity.data.demo`), in the order its own `seed` fixes.
Relative paths are relative to `base_dir` (the graph file's folder). A pattern matching nothing is an
error: a typo should not silently train on nothing.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from trinity.data.demo import iter_demo
from trinity.errors import SourceError
from trinity.spec.data import DemoSource, FilesSource, JsonlSource, ParquetSource, Source


def expand_paths(patterns: tuple[str, ...], base_dir: Path) -> list[Path]:
    """Files matching the patterns (relative to base_dir), sorted, without duplicates."""
    found: set[Path] = set()
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(Path(base_dir) / pattern)
        matches = [Path(m) for m in glob.glob(full, recursive=True) if Path(m).is_file()]
        if not matches:
            raise SourceError(f"path pattern {pattern!r} (under {base_dir}) matches no file")
        found.update(matches)
    return sorted(found)


def _iter_jsonl(source: JsonlSource, base_dir: Path) -> Iterator[str]:
    for path in expand_paths(source.paths, base_dir):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{lineno}: not a JSON object ({e.msg})") from e
                text = record.get(source.text_field) if isinstance(record, dict) else None
                if isinstance(text, str) and text:
                    yield text


def _iter_parquet(source: ParquetSource, base_dir: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in expand_paths(source.paths, base_dir):
        pf = pq.ParquetFile(path)
        if source.text_column not in pf.schema_arrow.names:
            raise SourceError(f"{path}: no column {source.text_column!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(batch_size=1024, columns=[source.text_column]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text:
                    yield text


def _iter_files(source: FilesSource, base_dir: Path) -> Iterator[str]:
    for path in expand_paths(source.paths, base_dir):
        if path.stat().st_size > source.max_bytes:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text:
            yield text


def iter_documents(source: Source, base_dir: Path | str = ".") -> Iterator[str]:
    """Each document's text of one source, streaming, in a deterministic order."""
    base = Path(base_dir)
    if isinstance(source, JsonlSource):
        return _iter_jsonl(source, base)
    if isinstance(source, ParquetSource):
        return _iter_parquet(source, base)
    if isinstance(source, FilesSource):
        return _iter_files(source, base)
    if isinstance(source, DemoSource):
        return iter_demo(source.corpus, source.seed, source.max_documents)
    raise TypeError(f"unknown source kind {type(source).__name__}")
