"""The math generator: answers checked by independent evaluation, the checker's accept/reject rules."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest

from trinity.data import mathgen
from trinity.data.mathgen import Problem, check, extract_answer, problems


def independent_answer(p: Problem) -> Fraction:
    """Solve the prompt without the generator's code: evaluate, substitute, or Cramer's rule."""
    nums = [int(x) for x in re.findall(r"-?\d+", p.prompt)]
    if p.kind in ("add", "sub", "mul", "div", "expr", "power", "frac"):
        expr = re.search(r"(?:What is|Evaluate) (.+?)[?.]", p.prompt)
        assert expr is not None
        text = expr.group(1).replace("^", "**")
        if p.kind == "frac":
            a, b, c, d = nums
            return Fraction(a, b) + Fraction(c, d)
        if p.kind == "div":
            a, b = nums
            assert a % b == 0
            return Fraction(a, b)
        return Fraction(eval(text))
    if p.kind == "linear":
        a, b, c = nums[0], nums[1], nums[2]
        sign = -1 if " - " in p.prompt else 1
        return Fraction(c - sign * b, a)
    a, b, c, d, e, f = nums
    return Fraction(c * e - b * f, a * e - b * d)


@pytest.mark.parametrize("kind", mathgen.KINDS)
def test_answers_are_exact(kind: str) -> None:
    for p in problems(seed=7, n=60, kinds=(kind,)):
        assert p.kind == kind
        assert mathgen.parse_number(p.answer) == independent_answer(p), p
        assert p.answer == mathgen.canonical(independent_answer(p))
        assert p.solution.endswith(f"Answer: {p.answer}")
        assert check(p.answer, p.solution)


def test_deterministic_and_seeded() -> None:
    assert problems(1, 20) == problems(1, 20)
    assert problems(1, 20) != problems(2, 20)
    assert {p.kind for p in problems(0, 300)} == set(mathgen.KINDS)


def test_checker_accepts_equal_values_and_rejects_others() -> None:
    assert check("1/2", "so the result is 0.5")
    assert check("1/2", "Answer: 2/4")
    assert check("-7", "x = 3 first, then Answer: -7")
    assert check("1234567", "Answer: 1,234,567")
    assert not check("1/2", "Answer: 1/3")
    assert not check("12", "no number here")
    assert not check("12", "Answer: 12 ... wait, Answer: 13")
    assert extract_answer("We get 4 and then 5") == "5"


def test_generate_uses_the_given_rng() -> None:
    a = mathgen.generate(np.random.default_rng(3))
    b = mathgen.generate(np.random.default_rng(3))
    assert a == b
