"""Pretraining's lr schedule: the decay start as a token count against its closed form, the fraction form
bit-equal to the formula it always had, and the rules that keep the two forms apart."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT
from trinity.cli import app
from trinity.optim.schedule import pretrain_lr_factor
from trinity.spec.optim import ScheduleSpec

runner = CliRunner()
TOTAL = 1_000_000


def closed_form(tokens: int, start: int, total: int, final: float, kind: str) -> float:
    """The warmup-free factor written out: 1 up to `start` tokens seen, then linear or half-cosine to `final`."""
    if tokens <= start:
        return 1.0
    x = (tokens - start) / (total - start)
    if kind == "linear":
        return 1.0 - (1.0 - final) * x
    return final + (1.0 - final) * (1.0 + math.cos(math.pi * x)) / 2


@pytest.mark.parametrize(("kind", "final"), [("linear", 0.0), ("cosine", 0.1)])
@pytest.mark.parametrize("start", [0, 123_457, 999_999])
def test_decay_starts_after_decay_start_tokens_and_ends_at_final_fraction(kind: str, final: float, start: int) -> None:
    schedule = ScheduleSpec(warmup_steps=0, decay=kind, final_fraction=final, decay_start_tokens=start)
    for tokens in sorted({0, start - 1, start, start + 1, (start + TOTAL) // 2, TOTAL - 1, TOTAL} - {-1}):
        got = pretrain_lr_factor(10**6, tokens, schedule, TOTAL)
        assert got == pytest.approx(closed_form(tokens, start, TOTAL, final, kind), abs=1e-12), tokens
    assert pretrain_lr_factor(10**6, start, schedule, TOTAL) == 1.0  # the last step before: the peak
    assert pretrain_lr_factor(10**6, start + 1, schedule, TOTAL) < 1.0  # the first step after: decayed
    assert pretrain_lr_factor(10**6, TOTAL, schedule, TOTAL) == pytest.approx(final, abs=1e-12)


def test_decay_start_tokens_keeps_the_warmup() -> None:
    schedule = ScheduleSpec(warmup_steps=100, decay="linear", decay_start_tokens=500_000)
    assert pretrain_lr_factor(9, 0, schedule, TOTAL) == pytest.approx(0.1)
    assert pretrain_lr_factor(9, 750_000, schedule, TOTAL) == pytest.approx(0.1 * 0.5)


@pytest.mark.parametrize(
    ("kind", "fraction", "final"), [("linear", 0.12, 0.0), ("cosine", 0.15, 0.1), ("linear", 0.2, 0.0)]
)
def test_fraction_form_is_bit_equal_to_the_formula_it_always_had(kind: str, fraction: float, final: float) -> None:
    schedule = ScheduleSpec(warmup_steps=2000, decay=kind, decay_fraction=fraction, final_fraction=final)
    total = 17_000_000_000_000
    for step, tokens in [(0, 0), (1999, 10**11), (5000, 14_449_999_999_999), (9000, 14_450_000_000_001), (9999, total)]:
        # trinity/optim/schedule.py before decay_start_tokens, written out.
        warmup = min(1.0, (step + 1) / 2000)
        start = (1.0 - fraction) * total
        if tokens <= start:
            old = warmup
        else:
            p = min(max((tokens - start) / max(total - start, 1.0), 0.0), 1.0)
            shape = (
                final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))
                if kind == "cosine"
                else 1.0 - (1.0 - final) * p
            )
            old = warmup * shape
        assert pretrain_lr_factor(step, tokens, schedule, total) == old


def test_both_forms_set_is_an_error_naming_the_field() -> None:
    result = runner.invoke(
        app, ["validate", str(ROOT / "graphs" / "trinity-large.yaml"), "--set", "optim.schedule.decay_fraction=0.15"]
    )
    assert result.exit_code == 2, result.output
    assert "optim.schedule.decay_fraction" in result.output and "decay_start_tokens" in result.output


def test_a_saved_spec_that_writes_the_default_fraction_out_still_validates() -> None:
    # A run's spec.yaml holds every field: decay_fraction at its default beside decay_start_tokens.
    schedule = ScheduleSpec(decay_start_tokens=5, decay_fraction=0.2)
    assert ScheduleSpec.model_validate(schedule.model_dump(mode="json")) == schedule


@pytest.mark.parametrize("start", ["17000000000000", "20000000000000"])
def test_decay_start_at_or_past_the_total_is_an_error_naming_the_field(start: str) -> None:
    result = runner.invoke(
        app,
        [
            "validate",
            str(ROOT / "graphs" / "trinity-large.yaml"),
            "--set",
            f"optim.schedule.decay_start_tokens={start}",
        ],
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "optim.schedule.decay_start_tokens" in text and "17000000000000" in text and "0 to 16999999999999" in text
