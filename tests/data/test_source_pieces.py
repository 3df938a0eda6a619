"""The piece invariant: reading the pieces of a pass from any address a read returned gives exactly the
documents after that address, in order, whatever the piece size, for every source format."""

from __future__ import annotations

import gzip
import json
from itertools import islice, pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trinity.data.demo import iter_demo
from trinity.data.sources import DEMO_PIECE_DOCUMENTS, Address, Piece, SourceReader, iter_documents
from trinity.spec.data import DemoSource, FilesSource, JsonlSource, ParquetFilter, ParquetSource, Source

WORDS = ["a", "héllo", "wörld", "日本語", "emoji 🎉", "x" * 40, "line\nbreak", "tab\t", ""]


def jsonl_lines(seed: int, n: int) -> tuple[list[str], list[str]]:
    """Lines of a JSONL file (blank lines, CRLF, records without text, empty text, varied lengths and
    unicode) and the documents they hold, in order: the reference the readers are checked against."""
    lines, docs = [], []
    for i in range(n):
        k = (seed * 7 + i * 13) % 11
        if k == 0:
            lines.append("")
        elif k == 1:
            lines.append(json.dumps({"other": i}))
        elif k == 2:
            lines.append(json.dumps({"text": ""}))
        else:
            text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k * (i % 5 + 1))) + f" #{seed}.{i}"
            lines.append(json.dumps({"id": i, "text": text}, ensure_ascii=(i % 2 == 0)) + ("\r" if k == 3 else ""))
            docs.append(text)
    return lines, docs


def write_jsonl(folder: Path, suffix: str) -> list[str]:
    """Three files (the last without a final newline), plain, gzip or zstd; returns their documents."""
    folder.mkdir(parents=True, exist_ok=True)
    all_docs: list[str] = []
    for f in range(3):
        lines, docs = jsonl_lines(f, 25 + 9 * f)
        data = ("\n".join(lines) + ("" if f == 2 else "\n")).encode()
        if suffix == ".gz":
            data = gzip.compress(data)
        elif suffix == ".zst":
            data = zstandard.ZstdCompressor().compress(data)
        (folder / f"part-{f}.jsonl{suffix}").write_bytes(data)
        all_docs += docs
    return all_docs


def write_parquet(folder: Path) -> list[str]:
    """Two files of several row groups with nulls, empty strings and a column to filter on."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: list[str] = []
    for f in range(2):
        texts = [None if i % 9 == 4 else ("" if i % 13 == 5 else f"doc {f}.{i} " + "é" * (i % 7)) for i in range(60)]
        langs = ["en" if i % 3 else "fr" for i in range(60)]
        scores = [i / 60 for i in range(60)]
        table = pa.table({"id": list(range(60)), "body": texts, "lang": langs, "score": scores})
        pq.write_table(table, folder / f"p{f}.parquet", row_group_size=7)
        expected += [t for t, g, s in zip(texts, langs, scores, strict=True) if t and g == "en" and s >= 0.1]
    return expected


def write_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = ["print(1)\n", "", "y" * 500, "ünïcode\n", "z = 2\n"]
    for i, text in enumerate(texts):
        (folder / f"f{i}.py").write_text(text)
    return [t for t in texts if t and len(t.encode()) <= 100]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Source, Path, list[str]]]:
    """Each format's source, its folder and the documents written into it."""
    root = tmp_path_factory.mktemp("sources")
    out: dict[str, tuple[Source, Path, list[str]]] = {}
    for name, suffix in (("plain", ""), ("gz", ".gz"), ("zst", ".zst")):
        docs = write_jsonl(root / name, suffix)
        out[name] = (JsonlSource(paths=(f"*.jsonl{suffix}",)), root / name, docs)
    filters = (ParquetFilter(column="lang", op="==", value="en"), ParquetFilter(column="score", op=">=", value=0.1))
    out["parquet"] = (ParquetSource(paths=("*.parquet",), text_column="body", filter=filters), root / "pq", [])
    out["parquet"] = (out["parquet"][0], root / "pq", write_parquet(root / "pq"))
    out["files"] = (FilesSource(paths=("*.py",), max_bytes=100), root / "files", write_files(root / "files"))
    out["demo"] = (DemoSource(corpus="math", seed=3, max_documents=300), root, list(iter_demo("math", 3, 300)))
    out["demo_code"] = (
        DemoSource(corpus="stdlib_code", seed=1, max_documents=300),
        root,
        list(iter_demo("stdlib_code", 1, 300)),
    )
    return out


def check_contiguous(pieces: list[Piece], start: Address, end: Address | None) -> None:
    if end is not None and start >= end:
        assert pieces == []
        return
    assert pieces[0].start == start
    assert pieces[-1].stop == end
    for a, b in pairwise(pieces):
        assert a.stop == b.start
    assert all(p.start < p.stop for p in pieces)


def read_from(reader: SourceReader, start: Address, piece_bytes: int) -> list[tuple[str, Address]]:
    pieces = list(reader.pieces(start, piece_bytes))
    check_contiguous(pieces, start, reader.end)
    out = []
    for piece in pieces:
        docs = list(reader.read(piece))
        assert all(after > piece.start for _, after in docs)  # each address-after lies past its piece's start
        out += docs
    return out


FORMATS = ["plain", "gz", "zst", "parquet", "files", "demo", "demo_code"]


@pytest.mark.parametrize("name", FORMATS)
def test_a_pass_reads_the_documents_written(name: str, cases: dict[str, tuple[Source, Path, list[str]]]) -> None:
    source, folder, expected = cases[name]
    assert list(iter_documents(source, folder)) == expected
    reader = SourceReader(source, folder)
    for piece_bytes in (1, 37, 10**9):
        docs = read_from(reader, Address(0, 0), piece_bytes)
        assert [text for text, _ in docs] == expected
        addresses = [after for _, after in docs]
        assert addresses == sorted(addresses) and len(set(addresses)) == len(addresses)
        assert addresses[-1] <= reader.end if reader.end is not None else True


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_pieces_from_any_returned_address_continue_the_pass(
    name: str, cases: dict[str, tuple[Source, Path, list[str]]], data: st.DataObject
) -> None:
    source, folder, expected = cases[name]
    reader = SourceReader(source, folder)
    full = read_from(reader, Address(0, 0), 10**9)
    i = data.draw(st.integers(0, len(full) - 1), label="after document")
    piece_bytes = data.draw(st.sampled_from([1, 37, 10**9]) | st.integers(1, 4000), label="piece_bytes")
    rest = read_from(reader, full[i][1], piece_bytes)
    assert [text for text, _ in rest] == expected[i + 1 :]
    assert rest == full[i + 1 :]  # the same addresses too


def test_plain_jsonl_pieces_are_byte_ranges(cases: dict[str, tuple[Source, Path, list[str]]]) -> None:
    source, folder, _ = cases["plain"]
    reader = SourceReader(source, folder)
    sizes = [Path(f).stat().st_size for f in reader.files]
    first_byte = [sum(sizes[:i]) for i in range(len(sizes) + 1)]  # of each file in the pass's bytes
    pieces = list(reader.pieces(Address(0, 0), 1000))
    stops = [first_byte[p.stop.file] + p.stop.offset for p in pieces]
    assert stops == [*range(1000, first_byte[-1], 1000), first_byte[-1]]  # a cut every 1000 bytes of the pass
    assert pieces[1] == Piece(Address(0, 1000), Address(0, 2000), 1000, 0)


def test_compressed_files_are_never_cut(cases: dict[str, tuple[Source, Path, list[str]]]) -> None:
    source, folder, _ = cases["zst"]
    reader = SourceReader(source, folder)
    assert [(p.start, p.stop) for p in reader.pieces(Address(1, 5), 1)] == [
        (Address(1, 5), Address(2, 0)),
        (Address(2, 0), Address(3, 0)),
    ]


def test_parquet_pieces_are_row_groups(cases: dict[str, tuple[Source, Path, list[str]]]) -> None:
    source, folder, _ = cases["parquet"]
    reader = SourceReader(source, folder)
    stops = [p.stop for p in reader.pieces(Address(0, 0), 1)]
    assert stops == [Address(0, r) for r in range(7, 60, 7)] + [Address(1, 0)] + [
        Address(1, r) for r in range(7, 60, 7)
    ] + [Address(2, 0)]
    assert all(p.est_documents == 7 and p.est_bytes > 7 for p in reader.pieces(Address(0, 0), 1) if p.stop.offset)


def test_endless_demo_pieces() -> None:
    reader = SourceReader(DemoSource(corpus="math", seed=5), ".")
    assert reader.end is None and reader.files == []
    pieces = list(islice(reader.pieces(Address(0, 10), 1), 3))
    assert [(p.start.offset, p.stop.offset, p.est_documents) for p in pieces] == [
        (10, 10 + DEMO_PIECE_DOCUMENTS, DEMO_PIECE_DOCUMENTS),
        (10 + DEMO_PIECE_DOCUMENTS, 10 + 2 * DEMO_PIECE_DOCUMENTS, DEMO_PIECE_DOCUMENTS),
        (10 + 2 * DEMO_PIECE_DOCUMENTS, 10 + 3 * DEMO_PIECE_DOCUMENTS, DEMO_PIECE_DOCUMENTS),
    ]
    docs = [text for piece in pieces[:2] for text, _ in reader.read(piece)]
    assert docs == list(islice(iter_demo("math", 5), 10, 10 + 2 * DEMO_PIECE_DOCUMENTS))
