"""The `tokenizer` section: a byte-level BPE trained on a sample of the data sources (PAPER.md 5)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, model_validator

from trinity.spec.base import SpecModel
from trinity.spec.data import MAX_COUNT
from trinity.spec.model import MAX_VOCAB
from trinity.spec.rules import Rules

DEFAULT_SPECIAL_TOKENS = (
    "<|doc|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)


class TokenizerSpec(SpecModel):
    """How the tokenizer node trains its byte-level BPE."""

    kind: Literal["byte_bpe"] = "byte_bpe"
    """Byte-level BPE (with byte fallback by construction: every byte is in the base alphabet)."""
    vocab_size: PositiveInt = Field(200_192, le=MAX_VOCAB)
    """Vocabulary size, special tokens included; must not exceed model.vocab_size."""
    digit_group: int = Field(3, ge=0, le=64)
    """Split digit runs into right-aligned groups of this many digits (0 leaves digits to BPE)."""
    isolate_scripts: bool = True
    """Pre-split CJK, Thai and similar scripts without spaces into single characters."""
    special_tokens: tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] = Field(
        DEFAULT_SPECIAL_TOKENS, max_length=4096
    )
    """Special tokens, added first in this order: document boundary, padding, chat roles."""
    sample_bytes: PositiveInt = Field(50_000_000, le=MAX_COUNT)
    """Bytes of text sampled from the sources to train on."""
    sources: tuple[str, ...] | None = None
    """Names of `data.sources` to sample from; None means all of them."""
    min_frequency: PositiveInt = Field(2, le=MAX_COUNT)
    """A pair must occur this often to be merged."""

    @model_validator(mode="after")
    def _rules(self) -> TokenizerSpec:
        rules = Rules()
        rules.check(
            len(set(self.special_tokens)) == len(self.special_tokens),
            "special_tokens",
            "must not repeat a token",
        )
        rules.check(
            self.vocab_size > 256 + len(self.special_tokens),
            "vocab_size",
            f"= {self.vocab_size} must exceed 256 bytes + {len(self.special_tokens)} special tokens",
        )
        rules.raise_if_any()
        return self
