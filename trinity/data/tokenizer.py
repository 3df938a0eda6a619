"""Training and loading the byte-level BPE tokenizer (PAPER.md 5).

Pipeline of the trained `tokenizer.json` (Hugging Face `tokenizers` format):
- no normalizer (decode(encode(x)) == x exactly, for any string);
- pre-tokenizers, in order: digit runs split into right-aligned groups of `digit_group`
  (`"1234567"` -> `"1" "234" "567"`); with `isolate_scripts`, each CJK/Thai/Lao/Khmer/Myanmar/
  Hangul/kana character alone; then the GPT-2 byte-level split;
- BPE over the 256-byte alphabet (byte fallback by construction), merges learnt from a sample;
- special tokens first, in the spec's order: ids 0.. are `<|doc|>` (document boundary, written after
  every document in the token store), `<|pad|>`, then the chat roles used by SFT.

Special-token text inside documents is encoded as plain text (`encode_special_tokens`), so a
document containing the string "<|doc|>" can never forge a boundary; the ids are only ever
inserted by code (`Tokenizer.doc_id`, `Tokenizer.special_ids`).

The sample: `sample_bytes` split evenly over the spec's sources (all by default); each source
contributes its documents in stream order until its share is reached (the last one cut to fit).
Training is deterministic for the same sample; the file's sha256 identifies the tokenizer
(`Tokenizer.sha256`, stored in every token store).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from trinity.data.sources import iter_documents
from trinity.spec.data import Source
from trinity.spec.tokenizer import TokenizerSpec

TOKENIZER_FILE = "tokenizer.json"
_SCRIPTS = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Hangul}]"


class Tokenizer:
    """A trained tokenizer: encode/decode plus the ids of its special tokens."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.hf = HFTokenizer.from_str(raw.decode("utf-8"))
        self.hf.encode_special_tokens = True
        specials = [t for t in json.loads(raw)["added_tokens"] if t["special"]]
        self.special_ids: dict[str, int] = {t["content"]: int(t["id"]) for t in specials}
        ordered = sorted(specials, key=lambda t: int(t["id"]))
        self.doc_id = int(ordered[0]["id"])
        """Document boundary (end of every document in the token store)."""
        self.pad_id = int(ordered[1]["id"]) if len(ordered) > 1 else self.doc_id
        """Padding (SFT packing)."""
        self.vocab_size = self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of a text (no special tokens added)."""
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust core."""
        return [list(e.ids) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids; special tokens come back as their text."""
        return str(self.hf.decode(list(ids), skip_special_tokens=False))

    def pieces(self, text: str) -> list[str]:
        """The decoded text of each token of `text` (for inspection and tests)."""
        return [self.decode([i]) for i in self.encode(text)]


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load `tokenizer.json` (or a directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer at {p}; run the tokenizer node first")
    return Tokenizer(p)


def build_untrained(spec: TokenizerSpec) -> tuple[HFTokenizer, trainers.BpeTrainer]:
    """The empty BPE pipeline of a spec, and its trainer."""
    tok = HFTokenizer(models.BPE())
    splits: list[pre_tokenizers.PreTokenizer] = []
    if spec.digit_group > 0:
        g = spec.digit_group
        # A run of 1..g digits followed by a multiple of g digits: groups aligned to the right.
        digits = rf"\p{{N}}{{1,{g}}}(?=(?:\p{{N}}{{{g}}})*(?!\p{{N}}))"
        splits.append(pre_tokenizers.Split(Regex(digits), "isolated"))
    if spec.isolate_scripts:
        splits.append(pre_tokenizers.Split(Regex(_SCRIPTS), "isolated"))
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def sample_documents(spec: TokenizerSpec, sources: dict[str, Source], base_dir: Path | str) -> dict[str, list[str]]:
    """The training sample: per source, documents in stream order up to its share of `sample_bytes`."""
    names = list(spec.sources) if spec.sources is not None else sorted(sources)
    share = spec.sample_bytes // max(1, len(names))
    sample: dict[str, list[str]] = {}
    for name in names:
        docs: list[str] = []
        used = 0
        for doc in iter_documents(sources[name], base_dir):
            size = len(doc.encode("utf-8"))
            if used + size > share:
                docs.append(doc.encode("utf-8")[: share - used].decode("utf-8", errors="ignore"))
                break
            docs.append(doc)
            used += size
        sample[name] = [d for d in docs if d]
    return sample


def train_tokenizer(
    spec: TokenizerSpec,
    sources: dict[str, Source],
    base_dir: Path | str,
    out_dir: Path | str,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the BPE on a sample of the sources, write `out_dir/tokenizer.json`, return metrics.

    The result depends only on the spec and the sources (the seed is accepted for the node
    contract; sampling is already deterministic). Metrics: sample bytes, train seconds and MB/s,
    encode MB/s, and per source the bytes per token of the trained tokenizer on its sample.
    """
    del seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sample = sample_documents(spec, sources, base_dir)
    t_sample = time.perf_counter() - t0
    tok, trainer = build_untrained(spec)

    def stream() -> Iterator[str]:
        for docs in sample.values():
            yield from docs

    total_bytes = sum(len(d.encode("utf-8")) for docs in sample.values() for d in docs)
    t1 = time.perf_counter()
    tok.train_from_iterator(stream(), trainer=trainer)
    t_train = time.perf_counter() - t1
    tmp = out / f"{TOKENIZER_FILE}.tmp"
    tmp.write_text(tok.to_str(pretty=True), encoding="utf-8")
    tmp.replace(out / TOKENIZER_FILE)

    loaded = load_tokenizer(out)
    per_source: dict[str, dict[str, float]] = {}
    t2 = time.perf_counter()
    for name, docs in sample.items():
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        n_tokens = sum(len(ids) for ids in loaded.encode_batch(docs))
        per_source[name] = {
            "documents": len(docs),
            "bytes": n_bytes,
            "tokens": n_tokens,
            "bytes_per_token": n_bytes / max(1, n_tokens),
        }
    t_encode = time.perf_counter() - t2
    return {
        "vocab_size": loaded.vocab_size,
        "sha256": loaded.sha256,
        "sample_bytes": total_bytes,
        "sample_seconds": t_sample,
        "train_seconds": t_train,
        "train_mb_per_s": total_bytes / 1e6 / max(t_train, 1e-9),
        "encode_mb_per_s": total_bytes / 1e6 / max(t_encode, 1e-9),
        "bytes_per_token": total_bytes / max(1, sum(s["tokens"] for s in per_source.values())),
        "sources": per_source,
    }
