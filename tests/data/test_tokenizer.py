"""The trained tokenizer: exact round trip, right-aligned digit groups, special tokens, determinism."""

from __future__ import annotations

from pathlib import Path

from tests.data.conftest import DEMO_SOURCES
from trinity.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from trinity.spec.tokenizer import DEFAULT_SPECIAL_TOKENS, TokenizerSpec

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcødé, emoji 🙂, tabs\tand  double  spaces, CRLF\r\n",
    "漢字とかなカナ, ภาษาไทย, 한국어",
    "Total: 1234567.89 and -0042, 10^12",
    "A literal <|doc|> in text is just text.",
    "\x00\x01 control bytes \ufffd",
    "",
]


def test_roundtrip_is_exact(tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_group_in_threes_from_the_right(tokenizer: Tokenizer) -> None:
    pre = [p for p, _ in tokenizer.hf.pre_tokenizer.pre_tokenize_str("1234567")]
    assert pre == ["1", "234", "567"]
    assert [p for p, _ in tokenizer.hf.pre_tokenizer.pre_tokenize_str("12345")] == ["12", "345"]
    # No token crosses a group boundary: cut points of the pieces fall only at 1 and 4 (or inside groups).
    pieces = tokenizer.pieces("1234567")
    cuts = {sum(len(p) for p in pieces[:i]) for i in range(1, len(pieces))}
    assert {1, 4} <= cuts
    assert all(len(p) <= 3 for p in pieces)


def test_special_tokens_first_and_never_forged(tokenizer: Tokenizer) -> None:
    assert [tokenizer.special_ids[t] for t in DEFAULT_SPECIAL_TOKENS] == list(range(len(DEFAULT_SPECIAL_TOKENS)))
    assert tokenizer.doc_id == 0 and tokenizer.pad_id == 1
    assert tokenizer.doc_id not in tokenizer.encode("before <|doc|> after")
    assert tokenizer.decode([tokenizer.doc_id]) == "<|doc|>"


def test_vocab_size_from_spec(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 768


def test_training_is_deterministic_and_reports_metrics(tmp_path: Path, tokenizer_dir: Path) -> None:
    spec = TokenizerSpec(vocab_size=768, sample_bytes=600_000)
    metrics = train_tokenizer(spec, DEMO_SOURCES, ".", tmp_path)
    assert metrics["sha256"] == load_tokenizer(tokenizer_dir).sha256
    assert set(metrics["sources"]) == {"code", "docs", "math"}
    for per in metrics["sources"].values():
        assert 1.5 < per["bytes_per_token"] < 8
    assert metrics["train_mb_per_s"] > 0 and metrics["encode_mb_per_s"] > 0
