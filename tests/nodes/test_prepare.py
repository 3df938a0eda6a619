"""The prepare node: quotas and held-out documents against a reference read of the sources, independence
from shards, workers and piece size, resume after a kill, and phases that continue each source's stream."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from trinity.data.positions import end_positions
from trinity.data.sources import iter_documents
from trinity.data.store import COMMIT_MARKER, open_store
from trinity.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from trinity.errors import SourceError, StoreError
from trinity.nodes.prepare import prepare_phase, prepare_shard, store_paths
from trinity.spec.data import DemoSource, JsonlSource, MixSpec, ParquetFilter, ParquetSource, Source
from trinity.spec.tokenizer import TokenizerSpec


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Source], Path]:
    """Sources of every kind the cut differs on: plain JSONL in two files (cut by bytes), a gzip file
    (one piece), a tiny JSONL source that must wrap, and the endless math demo. Returns (sources, tokenizer)."""
    root = tmp_path_factory.mktemp("data")
    docs = list(islice(iter_documents(DemoSource(corpus="stdlib_docs")), 120))
    for i in range(2):
        lines = [json.dumps({"text": d}) for d in docs[i * 60 : (i + 1) * 60]]
        (root / f"docs-{i}.jsonl").write_text("\n".join([*lines[:30], "", *lines[30:]]) + "\n")
    with gzip.open(root / "code.jsonl.gz", "wt") as f:
        for d in islice(iter_documents(DemoSource(corpus="stdlib_code")), 40):
            f.write(json.dumps({"text": d[:3000]}) + "\n")
    few = (json.dumps({"text": f"worksheet {i}: {i * 7} = 7 x {i}"}) + "\n" for i in range(5))
    (root / "few.jsonl").write_text("".join(few))
    sources: dict[str, Source] = {
        "docs": JsonlSource(paths=(str(root / "docs-*.jsonl"),)),
        "code": JsonlSource(paths=(str(root / "code.jsonl.gz"),)),
        "few": JsonlSource(paths=(str(root / "few.jsonl"),)),
        "math": DemoSource(corpus="math"),
    }
    tok = root / "tok"
    train_tokenizer(TokenizerSpec(vocab_size=512, sample_bytes=200_000), sources, ".", tok)
    return sources, tok


def stream(source: Source, holdout: int) -> Iterator[tuple[str, int]]:
    """Reference: the source's training documents read with iter_documents, pass after pass (pass number)."""
    passes = 1
    while True:
        yield from ((text, passes) for text in islice(iter_documents(source), holdout, None))
        passes += 1


def reference(tok: Tokenizer, source: Source, holdout: int, quotas: list[int]) -> list[list[np.ndarray]]:
    """Each phase's documents of one source (ids + boundary token), taken whole in stream order until its quota."""
    docs = stream(source, holdout)
    phases = []
    for quota in quotas:
        taken: list[np.ndarray] = []
        while sum(len(d) for d in taken) < quota:
            text, _ = next(docs)
            taken.append(np.asarray([*tok.encode(text), tok.doc_id], dtype=np.uint32))
        phases.append(taken)
    return phases


def documents(store_dir: Path, source: str) -> list[np.ndarray]:
    train = open_store(store_paths(store_dir)[0])
    index = train.sources.index(source)
    return [train.document(i) for i in range(train.n_docs) if train.doc_source[i] == index]


MIX = MixSpec(tokens=40_000, mix={"docs": 2.0, "code": 1.0, "few": 0.5, "math": 0.5})


def test_stores_match_a_reference_read_of_the_sources(data: tuple[dict[str, Source], Path], tmp_path: Path) -> None:
    sources, tok_dir = data
    tok = load_tokenizer(tok_dir)
    m = prepare_phase(MIX, sources, tok_dir, ".", tmp_path / "p", holdout_documents=2, piece_bytes=4000)
    train, held = (open_store(p) for p in store_paths(tmp_path / "p"))
    for name, quota in m["sources"].items():
        (want,) = reference(tok, sources[name], 2, [quota["quota"]])
        got = documents(tmp_path / "p", name)
        assert len(got) == len(want), name
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        assert held.attrs["source_documents"][name] == 2
        heldout = [np.asarray([*tok.encode(t), tok.doc_id]) for t in islice(iter_documents(sources[name]), 2)]
        idx = held.sources.index(name)
        mine = np.repeat(held.doc_source == idx, held.doc_lengths)
        np.testing.assert_array_equal(held.tokens[mine], np.concatenate(heldout))
    assert (train.tokens[train.doc_offsets[1:] - 1] == tok.doc_id).all()
    assert (train.tokens == tok.doc_id).sum() == train.n_docs
    # "few" has 3 short documents after holding out 2: its 4k-token quota wraps it many times, and it says so.
    assert m["sources"]["few"]["passes"] > 10 and train.attrs["source_passes"]["few"] == m["sources"]["few"]["passes"]
    assert m["sources"]["few"]["wrapped"] == m["sources"]["few"]["passes"] - 1
    assert train.attrs["tokenizer_sha256"] == tok.sha256


def test_result_does_not_depend_on_shards_workers_or_piece_size(
    data: tuple[dict[str, Source], Path], tmp_path: Path
) -> None:
    sources, tok_dir = data
    runs = {"base": (1, 1, 10**9), "shards3": (3, 1, 3000), "workers2": (4, 2, 1500), "tiny": (2, 1, 400)}
    stores, metrics = {}, {}
    for key, (shards, workers, piece) in runs.items():
        out = tmp_path / key
        metrics[key] = prepare_phase(
            MIX, sources, tok_dir, ".", out, holdout_documents=2, shards=shards, workers=workers, piece_bytes=piece
        )
        stores[key] = [open_store(p) for p in store_paths(out)]
    assert metrics["tiny"]["pieces"]["tokenized"] > 3 * metrics["base"]["pieces"]["tokenized"]  # really cut finer
    for key in runs:
        for a, b in zip(stores["base"], stores[key], strict=True):
            for name in ("tokens", "doc_offsets", "doc_source"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{key} {name}")
            assert a.attrs == b.attrs, key


def test_phase_two_continues_after_phase_one(data: tuple[dict[str, Source], Path], tmp_path: Path) -> None:
    """Phase 2 takes each source's next documents (the demo math continues; "few" wraps), a source not in its
    mix keeps its position, and held-out documents never reach training in any pass."""
    sources, tok_dir = data
    tok = load_tokenizer(tok_dir)
    one = MixSpec(tokens=12_000, mix={"docs": 1.0, "few": 0.1, "math": 1.0})
    two = MixSpec(tokens=9_000, mix={"docs": 1.0, "few": 0.1, "math": 1.0, "code": 0.5})
    three = MixSpec(tokens=6_000, mix={"math": 1.0})
    m1 = prepare_phase(one, sources, tok_dir, ".", tmp_path / "1", holdout_documents=2, piece_bytes=5000)
    after1, after2 = (tmp_path / "1"), (tmp_path / "2")
    m2 = prepare_phase(
        two, sources, tok_dir, ".", after2, holdout_documents=2, previous=end_positions(after1), shards=2
    )
    prepare_phase(three, sources, tok_dir, ".", tmp_path / "3", holdout_documents=2, previous=end_positions(after2))
    for name in ("docs", "few", "math"):
        quotas = [m1["sources"][name]["quota"], m2["sources"][name]["quota"]]
        want = reference(tok, sources[name], 2, quotas)
        for phase, expected in zip(("1", "2"), want, strict=True):
            got = documents(tmp_path / phase, name)
            assert len(got) == len(expected), (name, phase)
            assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), (name, phase)
        assert m2["sources"][name]["start"] == m1["sources"][name]["end"]
    # "code" is new in phase 2: from its start.
    (want_code,) = reference(tok, sources["code"], 2, [m2["sources"]["code"]["quota"]])
    assert all(np.array_equal(a, b) for a, b in zip(documents(tmp_path / "2", "code"), want_code, strict=True))
    math_quotas = [m1["sources"]["math"]["quota"], m2["sources"]["math"]["quota"], 6_000]
    want_math = reference(tok, sources["math"], 2, math_quotas)
    assert all(np.array_equal(a, b) for a, b in zip(documents(tmp_path / "3", "math"), want_math[2], strict=True))
    positions = open_store(tmp_path / "3" / "train").attrs["source_positions"]
    assert positions["docs"] == m2["sources"]["docs"]["end"] and positions["code"] == m2["sources"]["code"]["end"]
    # "few" (3 training documents) wraps in phase 1 and again in phase 2, continuing its pass count.
    assert 1 < m1["sources"]["few"]["passes"] < m2["sources"]["few"]["passes"]
    assert m2["sources"]["few"]["wrapped"] > 0 and m1["sources"]["docs"]["wrapped"] == 0
    held = open_store(tmp_path / "1" / "heldout")
    held_docs = {held.document(i).tobytes() for i in range(held.n_docs)}
    for phase in ("1", "2", "3"):
        train = open_store(tmp_path / phase / "train")
        assert not held_docs & {train.document(i).tobytes() for i in range(train.n_docs)}


def test_unreadable_source_fails_before_anything_is_committed(
    data: tuple[dict[str, Source], Path], tmp_path: Path
) -> None:
    sources, tok_dir = data
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all\n")
    broken = {**sources, "code": JsonlSource(paths=(str(bad),))}
    with pytest.raises(SourceError, match=r"bad\.jsonl\.gz: not a gzip file"):
        prepare_phase(MIX, broken, tok_dir, ".", tmp_path / "p", holdout_documents=2, piece_bytes=3000)
    assert not list((tmp_path / "p").rglob(COMMIT_MARKER))


def test_shard_tasks_then_the_node_keep_every_piece(data: tuple[dict[str, Source], Path], tmp_path: Path) -> None:
    """Slurm's way: each array task commits its shard's pieces; the node's job then tokenizes nothing of round 1."""
    sources, tok_dir = data
    args = {"holdout_documents": 2, "shards": 3, "piece_bytes": 3000}
    counts = [prepare_shard(MIX, sources, tok_dir, ".", tmp_path / "p", shard=i, **args) for i in range(3)]
    assert all(c["tokenized"] == c["pieces"] for c in counts) and sum(c["pieces"] > 0 for c in counts) >= 2
    assert prepare_shard(MIX, sources, tok_dir, ".", tmp_path / "p", shard=0, **args)["kept"] == counts[0]["pieces"]
    m = prepare_phase(MIX, sources, tok_dir, ".", tmp_path / "p", **args)
    assert m["pieces"]["kept"] == sum(c["pieces"] for c in counts)
    ref = prepare_phase(MIX, sources, tok_dir, ".", tmp_path / "ref", holdout_documents=2)
    got, want = (open_store(tmp_path / d / "train") for d in ("p", "ref"))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert m["sources"] == ref["sources"]


SCRIPT = """
import sys
from trinity.nodes.prepare import prepare_phase
from trinity.spec.data import DemoSource, MixSpec
sources = {"docs": DemoSource(corpus="stdlib_docs"), "math": DemoSource(corpus="math")}
mix = MixSpec(tokens=int(sys.argv[3]), mix={"docs": 1.0, "math": 1.0})
prepare_phase(mix, sources, sys.argv[1], ".", sys.argv[2], holdout_documents=1, shards=4)
"""


@pytest.mark.slow
def test_killed_prepare_resumes_keeping_committed_pieces(data: tuple[dict[str, Source], Path], tmp_path: Path) -> None:
    _, tok_dir = data
    out = tmp_path / "phase"
    tokens = 1_200_000
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tok_dir), str(out), str(tokens)], cwd=os.getcwd())
    deadline = time.monotonic() + 120
    while len(committed := sorted(out.glob(f"pieces/*/*/{COMMIT_MARKER}"))) < 2:
        assert proc.poll() is None, "prepare ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.parent: (p.parent.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob(f"pieces/*/*/{COMMIT_MARKER}")}
    assert len(kept) >= len(committed)
    for path in store_paths(out):  # nothing is taken as finished...
        with pytest.raises(StoreError):
            open_store(path)
    sources: dict[str, Source] = {"docs": DemoSource(corpus="stdlib_docs"), "math": DemoSource(corpus="math")}
    mix = MixSpec(tokens=tokens, mix={"docs": 1.0, "math": 1.0})
    m = prepare_phase(mix, sources, tok_dir, ".", out, holdout_documents=1, shards=4)
    assert m["pieces"]["kept"] == len(kept) and m["pieces"]["tokenized"] > 0
    for piece, stamp in kept.items():  # ...and the committed pieces were kept as they were
        assert (piece.stat().st_ino, (piece / COMMIT_MARKER).stat().st_mtime_ns) == stamp
    assert not list(out.rglob("*.tmp-*"))
    ref = tmp_path / "ref"
    prepare_phase(mix, sources, tok_dir, ".", ref, holdout_documents=1)
    for a, b in zip(store_paths(out), store_paths(ref), strict=True):
        sa, sb = open_store(a), open_store(b)
        np.testing.assert_array_equal(sa.tokens, sb.tokens)
        np.testing.assert_array_equal(sa.doc_offsets, sb.doc_offsets)
        assert sa.attrs == sb.attrs


def test_zstd_and_filtered_parquet_sources_prepare_like_a_reference_read(
    data: tuple[dict[str, Source], Path], tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    _, tok_dir = data
    tok = load_tokenizer(tok_dir)
    texts = list(islice(iter_documents(DemoSource(corpus="stdlib_docs", seed=3)), 80))
    for i in range(2):  # two .zst files, matched by a glob
        lines = "".join(json.dumps({"body": t}) + "\n" for t in texts[i * 20 : (i + 1) * 20])
        (tmp_path / f"web-{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    table = pa.table({"text": texts[40:], "lang": ["en", "fr"] * 20, "score": [i / 40 for i in range(40)]})
    pq.write_table(table, tmp_path / "wiki.parquet", row_group_size=7)
    sources: dict[str, Source] = {
        "web": JsonlSource(paths=(str(tmp_path / "web-*.jsonl.zst"),), text_field="body"),
        "wiki": ParquetSource(
            paths=(str(tmp_path / "wiki.parquet"),),
            filter=(
                ParquetFilter(column="lang", op="==", value="en"),
                ParquetFilter(column="score", op=">=", value=0.2),
            ),
        ),
    }
    mix = MixSpec(tokens=12_000, mix={"web": 1.0, "wiki": 1.0})
    m = prepare_phase(
        mix, sources, tok_dir, ".", tmp_path / "p", holdout_documents=1, piece_bytes=3000, workers=2, shards=3
    )
    # The reference applies the filter itself: English rows with score >= 0.2, in file order.
    kept = [t for i, t in enumerate(texts[40:]) if i % 2 == 0 and i / 40 >= 0.2]
    assert [d for d in iter_documents(sources["wiki"])] == kept
    for name in ("web", "wiki"):
        (want,) = reference(tok, sources[name], 1, [m["sources"][name]["quota"]])
        got = documents(tmp_path / "p", name)
        assert [d.tolist() for d in got] == [d.tolist() for d in want], name
