"""The tokenizer node: train the byte-level BPE on a sample of the sources (PAPER.md 5).

`run_tokenize(spec, sources, base_dir, out_dir, seed)` writes `out_dir/tokenizer.json` and returns
the training metrics of `trinity.data.tokenizer.train_tokenizer` plus two checks of the result:
the round trip on a probe text and the digit grouping of a long number. The node knows nothing of
the scheduler; the file is written under a temporary name and renamed, so a killed run leaves none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trinity.data.tokenizer import TOKENIZER_FILE, load_tokenizer, train_tokenizer
from trinity.spec.data import Source
from trinity.spec.tokenizer import TokenizerSpec

PROBE = "def f(x):\n    return 1234567 * x  # 漢字 ünïcødé\t<|doc|>\n"


def run_tokenize(
    spec: TokenizerSpec,
    sources: dict[str, Source],
    base_dir: Path | str,
    out_dir: Path | str,
    seed: int = 0,
) -> dict[str, Any]:
    """Train, write `out_dir/tokenizer.json`, verify it, and return the metrics."""
    metrics = train_tokenizer(spec, sources, base_dir, out_dir, seed)
    tok = load_tokenizer(Path(out_dir) / TOKENIZER_FILE)
    roundtrip = tok.decode(tok.encode(PROBE)) == PROBE
    if not roundtrip:
        raise RuntimeError(f"tokenizer at {out_dir} does not round-trip its probe text; this is a bug")
    metrics["roundtrip"] = roundtrip
    metrics["digit_pieces"] = [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str("1234567")]
    metrics["path"] = str(Path(out_dir) / TOKENIZER_FILE)
    return metrics
