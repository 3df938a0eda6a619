"""Real sources: compressed JSONL, filtered Parquet, fsspec URLs, globs over thousands of files, and
sources that cannot be read failing with the path and the reason."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from pydantic import ValidationError

import trinity.data.source_files as source_files
from trinity.data.sources import Address, SourceReader, iter_documents
from trinity.errors import SourceError
from trinity.spec.data import JsonlSource, ParquetSource


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_by_file_name(tmp_path: Path, suffix: str) -> None:
    texts = [f"doc {i} ü" for i in range(1000)]
    data = jsonl(texts)
    packed = gzip.compress(data) if suffix == ".gz" else zstandard.ZstdCompressor().compress(data)
    # two zstd frames in one file (as pzstd writes) still read as one stream
    if suffix == ".zst":
        packed = zstandard.ZstdCompressor().compress(data[:5000]) + zstandard.ZstdCompressor().compress(data[5000:])
    (tmp_path / f"a.jsonl{suffix}").write_bytes(packed)
    source = JsonlSource(paths=(f"a.jsonl{suffix}",))
    SourceReader(source, tmp_path).check()
    assert list(iter_documents(source, tmp_path)) == texts


def test_json_only_the_standard_library_accepts_still_reads(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x", "score": NaN}\n{"text": "y"}\n')
    assert list(iter_documents(JsonlSource(paths=("a.jsonl",)), tmp_path)) == ["x", "y"]


def test_parquet_filter_terms(tmp_path: Path) -> None:
    table = pa.table(
        {
            "text": [f"t{i}" for i in range(30)],
            "lang": [["en", "fr", "de"][i % 3] for i in range(30)],
            "n": list(range(30)),
        }
    )
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=8)
    rows = table.to_pylist()
    ops: dict[str, Callable[[Any, Any], bool]] = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
        "in": lambda a, b: a in b,
        "not in": lambda a, b: a not in b,
    }
    for op, check in ops.items():
        value: object = ["en", "de"] if op.endswith("in") else 17
        column = "lang" if op.endswith("in") else "n"
        terms = [{"column": column, "op": op, "value": value}, {"column": "n", "op": "!=", "value": 3}]
        source = ParquetSource.model_validate({"paths": ["a.parquet"], "filter": terms})
        SourceReader(source, tmp_path).check()
        expected = [r["text"] for r in rows if check(r[column], value) and r["n"] != 3]
        assert list(iter_documents(source, tmp_path)) == expected, op


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ({"column": "lang", "op": "in", "value": "en"}, "value: must be a list for op 'in'"),
        ({"column": "lang", "op": "==", "value": ["en"]}, "value: must be a single value"),
        ({"column": "lang", "op": "~=", "value": "en"}, "filter.0.op"),
    ],
)
def test_spec_rejects_a_bad_filter_naming_the_field(term: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=r"filter\.0") as caught:
        ParquetSource.model_validate({"paths": ["a.parquet"], "filter": [term]})
    assert message in str(caught.value)


def test_file_urls_and_globs_over_thousands_of_files(tmp_path: Path) -> None:
    expected: dict[str, str] = {}
    for i in range(2000):
        folder = tmp_path / "shards" / f"d{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"s{i:04d}.jsonl").write_bytes(jsonl([f"doc {i}"]))
        expected[f"{folder}/s{i:04d}.jsonl"] = f"doc {i}"
    (tmp_path / "shards" / "d0" / ".hidden.jsonl").write_bytes(jsonl(["hidden"]))
    order = sorted(expected, key=lambda p: Path(p).parts)
    # a relative glob (twice: deduplicated) and the same files as a file:// URL
    for patterns in (("shards/**/*.jsonl", "shards/d1/*.jsonl"), (f"file://{tmp_path}/shards/*/*.jsonl",)):
        reader = SourceReader(JsonlSource(paths=patterns), tmp_path)
        reader.check()
        assert [f.removeprefix("file://") for f in reader.files] == order
        assert reader.end == Address(2000, 0)
        docs = [text for piece in reader.pieces(Address(0, 0), 10_000) for text, _ in reader.read(piece)]
        assert docs == [expected[p] for p in order]


def test_too_many_files_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        (tmp_path / f"{i}.jsonl").write_bytes(jsonl(["x"]))
    monkeypatch.setattr(source_files, "MAX_FILES", 3)
    with pytest.raises(SourceError, match="more than 3 files"):
        SourceReader(JsonlSource(paths=("*.jsonl",)), tmp_path)


def test_object_store_without_its_package_names_the_package() -> None:
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401

        pytest.skip("s3fs is installed here")
    except ImportError:
        pass
    with pytest.raises(SourceError, match=r"s3://bucket/x\.jsonl: reading s3:// needs the s3fs package"):
        SourceReader(JsonlSource(paths=("s3://bucket/x.jsonl",)), ".")


def unreadable(tmp_path: Path, case: str) -> tuple[JsonlSource | ParquetSource, str]:
    """A source that cannot be read, and the reason its error must give (after the file's path)."""
    if case == "not gzip":
        (tmp_path / "a.jsonl.gz").write_bytes(jsonl(["plain"]))
        return JsonlSource(paths=("a.jsonl.gz",)), r"a\.jsonl\.gz: not a gzip file \(bad magic\)"
    if case == "bad first line":
        (tmp_path / "a.jsonl").write_text('\n{"text": oops}\n')
        return JsonlSource(paths=("a.jsonl",)), r"a\.jsonl: the first line is not JSON"
    table = pa.table({"id": [1], "body": ["x"], "n": [1]})
    pq.write_table(table, tmp_path / "a.parquet")
    if case == "no column":
        return ParquetSource(paths=("a.parquet",)), r"a\.parquet: no column 'text' \(columns: id, body, n\)"
    if case == "not a string column":
        return ParquetSource(paths=("a.parquet",), text_column="id"), r"a\.parquet: column 'id' is int64"
    if case == "filter column":
        terms = [{"column": "lang", "op": "==", "value": "en"}]
        source = ParquetSource.model_validate({"paths": ["a.parquet"], "text_column": "body", "filter": terms})
        return source, r"a\.parquet: no column 'lang'"
    assert case == "filter type"
    terms = [{"column": "n", "op": "==", "value": "en"}]
    source = ParquetSource.model_validate({"paths": ["a.parquet"], "text_column": "body", "filter": terms})
    return source, r"a\.parquet: the filter does not apply to its columns"


CASES = ["not gzip", "bad first line", "no column", "not a string column", "filter column", "filter type"]


@pytest.mark.parametrize("case", CASES)
def test_check_names_the_path_and_the_reason(tmp_path: Path, case: str) -> None:
    source, reason = unreadable(tmp_path, case)
    with pytest.raises(SourceError, match=f"^{tmp_path}/{reason}"):
        SourceReader(source, tmp_path).check()


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"'nope\.jsonl' .* matches no file"):
        SourceReader(JsonlSource(paths=("nope.jsonl",)), tmp_path)
    (tmp_path / "a.jsonl").write_bytes(jsonl(["x"]))
    reader = SourceReader(JsonlSource(paths=("a.jsonl",)), tmp_path)
    (tmp_path / "a.jsonl").unlink()  # gone between listing and checking
    with pytest.raises(SourceError, match=f"^{tmp_path}/a.jsonl: no such file"):
        reader.check()


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_truncated_compressed_file_fails_its_read(tmp_path: Path, suffix: str) -> None:
    data = jsonl([f"document number {i}" for i in range(20_000)])
    packed = gzip.compress(data) if suffix == ".gz" else zstandard.ZstdCompressor().compress(data)
    (tmp_path / f"a.jsonl{suffix}").write_bytes(packed[: len(packed) // 2])
    reader = SourceReader(JsonlSource(paths=(f"a.jsonl{suffix}",)), tmp_path)
    reader.check()  # the start is fine: only reading to the end finds the damage
    with pytest.raises(SourceError, match=f"^{tmp_path}/a.jsonl{suffix}: truncated"):
        list(iter_documents(reader.source, tmp_path))


def test_a_filesystem_that_is_not_local(tmp_path: Path) -> None:
    """fsspec's in-memory filesystem stands in for an object store: files are opened through fsspec."""
    import fsspec

    fs = fsspec.filesystem("memory")
    texts = [f"doc {i}" for i in range(50)]
    with fs.open("/trinity-test/b/x.jsonl.gz", "wb") as f:
        f.write(gzip.compress(jsonl(texts[:20])))
    with fs.open("/trinity-test/b/y.parquet", "wb") as f:
        pq.write_table(pa.table({"text": texts[20:]}), f, row_group_size=10)
    try:
        reader = SourceReader(JsonlSource(paths=("memory://trinity-test/b/*.jsonl.gz",)), tmp_path)
        reader.check()
        assert reader.files == ["memory:///trinity-test/b/x.jsonl.gz"]
        assert list(iter_documents(reader.source, tmp_path)) == texts[:20]
        source = ParquetSource(paths=("memory://trinity-test/b/*.parquet",))
        SourceReader(source, tmp_path).check()
        assert list(iter_documents(source, tmp_path)) == texts[20:]
    finally:
        fs.rm("/trinity-test", recursive=True)
