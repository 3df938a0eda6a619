"""Arithmetic and algebra problems with exact answers, and the checker that grades a response.

One generator feeds three consumers: pretraining (`demo.iter_math` writes worksheets of
`Problem: ...\\nSolution: ...` blocks), SFT (prompt as the user turn, solution as the assistant
turn) and RL with verifiable rewards (`check(problem.answer, response)` is the exact-answer reward).

A `Problem` holds:
- `prompt`: the question, plain text;
- `answer`: the exact answer as a canonical string: an integer (`"-42"`) or a reduced fraction
  (`"7/3"`, sign on the numerator);
- `solution`: worked steps ending with the line `Answer: <answer>`;
- `kind`: which family it came from (`add`, `sub`, `mul`, `div`, `expr`, `frac`, `linear`, `system`, `power`).

`extract_answer(text)` reads the number after the last `Answer:` (or, failing that, the last number
in the text); `check(answer, response)` compares it with the exact answer as rational numbers, so
`"0.5"`, `"1/2"` and `"2/4"` all match `"1/2"` (and `"1,234"` matches `"1234"`). Generation is deterministic for a given
`numpy.random.Generator` state; `problems(seed, n)` gives a reproducible list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

KINDS = ("add", "sub", "mul", "div", "expr", "frac", "linear", "system", "power")
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*-?\d+)?"
_ANSWER_RE = re.compile(r"Answer:\s*(" + _NUMBER + ")")
_NUMBER_RE = re.compile(_NUMBER)


@dataclass(frozen=True)
class Problem:
    """One problem: its prompt, its exact canonical answer, a worked solution, and its kind."""

    prompt: str
    answer: str
    solution: str
    kind: str


def canonical(value: Fraction | int) -> str:
    """The canonical answer string: `"12"`, `"-7/3"`."""
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def parse_number(text: str) -> Fraction | None:
    """An integer, decimal or fraction (`"3"`, `"-0.25"`, `"6/8"`) as a Fraction; None if it is not one."""
    text = text.strip().replace(" ", "").replace(",", "")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return Fraction(Fraction(num), Fraction(den))
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(response: str) -> str | None:
    """The answer a response gives: after its last `Answer:`, else its last number; None if none."""
    found = _ANSWER_RE.findall(response)
    if found:
        return str(found[-1])
    numbers = _NUMBER_RE.findall(response)
    return str(numbers[-1]) if numbers else None


def check(answer: str, response: str) -> bool:
    """True when the response's answer equals the exact answer as a rational number."""
    given = extract_answer(response)
    if given is None:
        return False
    expected, got = parse_number(answer), parse_number(given)
    return expected is not None and got is not None and expected == got


def _int(rng: np.random.Generator, digits_max: int = 4) -> int:
    """A positive integer with a random number of digits (1..digits_max), so long numbers occur."""
    digits = int(rng.integers(1, digits_max + 1))
    return int(rng.integers(10 ** (digits - 1), 10**digits))


def _done(prompt: str, steps: list[str], answer: Fraction | int, kind: str) -> Problem:
    ans = canonical(answer)
    return Problem(prompt, ans, "\n".join([*steps, f"Answer: {ans}"]), kind)


def _add(rng: np.random.Generator) -> Problem:
    a, b = _int(rng, 7), _int(rng, 7)
    return _done(f"What is {a} + {b}?", [f"{a} + {b} = {a + b}"], a + b, "add")


def _sub(rng: np.random.Generator) -> Problem:
    a, b = _int(rng, 7), _int(rng, 7)
    return _done(f"What is {a} - {b}?", [f"{a} - {b} = {a - b}"], a - b, "sub")


def _mul(rng: np.random.Generator) -> Problem:
    a, b = _int(rng, 4), _int(rng, 3)
    return _done(f"What is {a} * {b}?", [f"{a} * {b} = {a * b}"], a * b, "mul")


def _div(rng: np.random.Generator) -> Problem:
    b, q = _int(rng, 2), _int(rng, 4)
    a = b * q
    return _done(f"What is {a} / {b}?", [f"{a} / {b} = {q} because {b} * {q} = {a}"], q, "div")


def _expr(rng: np.random.Generator) -> Problem:
    a, b, c, d = (_int(rng, 2) for _ in range(4))
    bc = b * c
    steps = [f"Multiplication first: {b} * {c} = {bc}", f"{a} + {bc} - {d} = {a + bc - d}"]
    return _done(f"Evaluate {a} + {b} * {c} - {d}.", steps, a + bc - d, "expr")


def _frac(rng: np.random.Generator) -> Problem:
    a, c = (int(rng.integers(1, 10)) for _ in range(2))
    b, d = (int(rng.integers(2, 13)) for _ in range(2))
    x, y = Fraction(a, b), Fraction(c, d)
    lcd = b * d // np.gcd(b, d)
    steps = [
        f"Common denominator {lcd}: {a * (lcd // b)}/{lcd} + {c * (lcd // d)}/{lcd}",
        f"= {a * (lcd // b) + c * (lcd // d)}/{lcd} = {canonical(x + y)}",
    ]
    return _done(f"What is {a}/{b} + {c}/{d}? Give the answer as a reduced fraction.", steps, x + y, "frac")


def _linear(rng: np.random.Generator) -> Problem:
    a = int(rng.integers(2, 13)) * int(rng.choice([-1, 1]))
    x = int(rng.integers(-50, 51))
    b = int(rng.integers(-100, 101))
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    move = f"Subtract {b} from" if b >= 0 else f"Add {-b} to"
    steps = [f"{move} both sides: {a}x = {c - b}", f"Divide by {a}: x = {x}"]
    return _done(f"Solve for x: {a}x {sign} {abs(b)} = {c}.", steps, x, "linear")


def _system(rng: np.random.Generator) -> Problem:
    while True:
        a, b, d, e = (int(rng.integers(-9, 10)) for _ in range(4))
        det = a * e - b * d
        if det != 0 and b != 0:
            break
    x, y = int(rng.integers(-20, 21)), int(rng.integers(-20, 21))
    c, f = a * x + b * y, d * x + e * y
    steps = [
        f"Eliminate y: ({a}*{e} - {b}*{d})x = {c}*{e} - {b}*{f}",
        f"{det}x = {c * e - b * f}, so x = {x}",
    ]
    return _done(f"Solve the system {a}x + {b}y = {c}, {d}x + {e}y = {f}. What is x?", steps, x, "system")


def _power(rng: np.random.Generator) -> Problem:
    a, n = int(rng.integers(2, 13)), int(rng.integers(2, 6))
    return _done(f"What is {a}^{n}?", [f"{a}^{n} = {' * '.join([str(a)] * n)} = {a**n}"], a**n, "power")


_MAKERS: dict[str, Callable[[np.random.Generator], Problem]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "expr": _expr,
    "frac": _frac,
    "linear": _linear,
    "system": _system,
    "power": _power,
}


def generate(rng: np.random.Generator, kinds: tuple[str, ...] = KINDS) -> Problem:
    """One problem of a uniformly chosen kind."""
    return _MAKERS[kinds[int(rng.integers(len(kinds)))]](rng)


def problems(seed: int, n: int, kinds: tuple[str, ...] = KINDS) -> list[Problem]:
    """`n` problems, the same for the same seed (e.g. an RL prompt set or an eval set)."""
    rng = np.random.default_rng([seed, 0x5EED])
    return [generate(rng, kinds) for _ in range(n)]
