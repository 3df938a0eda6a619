"""MK-NIAH: haystacks of an exact length with their needles and the question last, exact-match scoring,
and the choice between two values by the model's likelihood."""

from __future__ import annotations

import pytest
import torch

from tests.nodes.fake_tokenizer import CharTokenizer
from trinity.evals.niah import is_correct, make_haystack, needle_text, question_text, value_choice


@pytest.mark.parametrize(("length", "n_keys"), [(300, 2), (1000, 4)])
def test_haystack_has_exact_length_needles_and_the_question_last(length: int, n_keys: int) -> None:
    tok = CharTokenizer()
    h = make_haystack(tok, length, n_keys, seed=0, index=3)
    assert len(h.ids) == length
    text = tok.decode(h.ids)
    assert text.endswith(question_text(h.key))
    assert len({k for k, _ in h.needles}) == n_keys and (h.key, h.value) in h.needles
    positions = [text.index(needle_text(k, v)) for k, v in h.needles]
    assert positions == sorted(positions)  # needles appear once each, in the recorded order
    assert all(len(v) == 6 and v.isdigit() for _, v in h.needles)
    assert make_haystack(tok, length, n_keys, 0, 3) == h and make_haystack(tok, length, n_keys, 0, 4) != h


def test_haystack_too_short_is_refused() -> None:
    with pytest.raises(ValueError, match="need more than"):
        make_haystack(CharTokenizer(), 60, 3, 0, 0)


@pytest.mark.parametrize(
    ("output", "ok"),
    [(" 482913.", True), ("482913", True), (" 482913 and 5", True), (" 48291", False), (" 4829134", False)],
)
def test_niah_exact_match(output: str, ok: bool) -> None:
    assert is_correct(output, "482913") is ok
    assert not is_correct(" 7 then 482913", "482913")  # the first number counts


class _Favours:
    """A stand-in model whose next-token logits favour the characters of one string."""

    def __init__(self, text: str) -> None:
        self.ids = CharTokenizer().encode(text)

    def __call__(self, ids: torch.Tensor) -> object:
        logits = torch.zeros(*ids.shape, CharTokenizer().vocab_size)
        logits[..., self.ids] = 5.0

        class Out:
            pass

        out = Out()
        out.logits = logits  # type: ignore[attr-defined]
        return out


def test_niah_choice_prefers_the_value_the_model_finds_likely() -> None:
    tok = CharTokenizer()
    h = make_haystack(tok, 400, 2, seed=1, index=0)
    other = next(v for _, v in h.needles if v != h.value)
    assert not set(other) <= set(h.value)  # the two values use different digits
    assert value_choice(_Favours(" " + h.value), tok, h) is True  # type: ignore[arg-type]
    assert value_choice(_Favours(" " + other), tok, h) is False  # type: ignore[arg-type]
