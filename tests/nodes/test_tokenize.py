"""The tokenizer node: writes tokenizer.json, verifies it, reports throughput and compression."""

from __future__ import annotations

import json
from pathlib import Path

from trinity.data.tokenizer import load_tokenizer
from trinity.nodes.tokenize import run_tokenize
from trinity.spec.data import DemoSource
from trinity.spec.tokenizer import TokenizerSpec


def test_tokenize_node(tmp_path: Path) -> None:
    sources = {"docs": DemoSource(corpus="stdlib_docs"), "math": DemoSource(corpus="math")}
    spec = TokenizerSpec(vocab_size=400, sample_bytes=200_000, sources=("math",))
    metrics = run_tokenize(spec, sources, ".", tmp_path / "tok")
    assert metrics["roundtrip"] is True
    assert metrics["digit_pieces"] == ["1", "234", "567"]
    assert set(metrics["sources"]) == {"math"}  # only the spec's sources are sampled
    assert metrics["sample_bytes"] <= 200_000
    assert json.dumps(metrics)  # plain data
    tok = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert tok.vocab_size == 400
    assert not list((tmp_path / "tok").glob("*.tmp"))
