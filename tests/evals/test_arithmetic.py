"""The held-out arithmetic set never holds a prompt the model was trained on."""

from __future__ import annotations

from trinity.data.chat import math_sft_problems
from trinity.evals.arithmetic import heldout_problems


def test_heldout_arithmetic_excludes_training_prompts() -> None:
    trained = {p.prompt for p in math_sft_problems(0, 500)}
    held = heldout_problems(0, 100, trained)
    assert len(held) == 100 and not {p.prompt for p in held} & trained
    assert len({p.prompt for p in held}) == 100
    assert held == heldout_problems(0, 100, trained)
