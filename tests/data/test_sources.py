"""Reading JSONL, Parquet and file globs, streaming and in a deterministic order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trinity.data.sources import iter_documents
from trinity.errors import SourceError
from trinity.spec.data import DemoSource, FilesSource, JsonlSource, ParquetSource


def test_jsonl(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"body": "first"}) + "\n\n" + json.dumps({"other": 1}) + "\n" + json.dumps({"body": "x"}) + "\n"
    )
    docs = list(iter_documents(JsonlSource(paths=("*.jsonl",), text_field="body"), tmp_path))
    assert docs == ["first", "x", "second"]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(SourceError, match=r"a.jsonl:2"):
        list(iter_documents(JsonlSource(paths=("a.jsonl",)), tmp_path))


def test_parquet_streams_batches(tmp_path: Path) -> None:
    texts = [f"doc {i}" for i in range(2500)] + [None]
    pq.write_table(pa.table({"content": texts}), tmp_path / "d.parquet", row_group_size=700)
    it = iter_documents(ParquetSource(paths=("d.parquet",), text_column="content"), tmp_path)
    assert next(it) == "doc 0"
    assert [*["doc 0"], *it] == texts[:-1]
    with pytest.raises(SourceError, match="no column"):
        list(iter_documents(ParquetSource(paths=("d.parquet",)), tmp_path))


def test_files_glob_and_size_limit(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_bytes(b"b = '\xff'\n")
    (tmp_path / "pkg" / "big.py").write_text("x" * 100)
    docs = list(iter_documents(FilesSource(paths=("pkg/**/*.py",), max_bytes=50), tmp_path))
    assert docs == ["a = 1\n", "b = '\ufffd'\n"]


def test_pattern_matching_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="matches no file"):
        list(iter_documents(FilesSource(paths=("nope/*.txt",)), tmp_path))


def test_demo_source_respects_max_documents() -> None:
    assert len(list(iter_documents(DemoSource(corpus="stdlib_docs", max_documents=3)))) == 3
