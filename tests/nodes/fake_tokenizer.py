"""A character-level tokenizer with the chat special tokens, for hand-computed cases."""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = ("<|doc|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
OFFSET = len(SPECIALS)


class CharTokenizer:
    """Specials are ids 0..5; character c is id ord(c) - 32 + 6 (printable ASCII)."""

    def __init__(self) -> None:
        self.special_ids = {s: i for i, s in enumerate(SPECIALS)}
        self.doc_id, self.pad_id = 0, 1
        self.vocab_size = OFFSET + 95

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 + OFFSET for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(SPECIALS[i] if i < OFFSET else chr(i - OFFSET + 32) for i in ids)
