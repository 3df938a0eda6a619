"""The loss-spike detector (trinity.optim.spikes) against numpy's mean and std, and its resumable state."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from trinity.optim.spikes import SpikeDetector
from trinity.spec.stability import SpikeSpec


def feed(detector: SpikeDetector, losses: list[float]) -> list[int]:
    """The steps (numbered from 1) the detector flags."""
    return [step for step, loss in enumerate(losses, 1) if detector.check(step, loss) is not None]


def test_zscore_matches_numpy_and_waits_for_a_full_window() -> None:
    rng = np.random.default_rng(0)
    window = rng.normal(3.0, 0.1, size=8).tolist()
    detector = SpikeDetector(SpikeSpec(window=8, threshold=4.0))
    # A huge loss while the window fills is not judged (and enters the window).
    assert feed(detector, window[:7]) == [] and detector.check(8, 1e6) is None
    detector = SpikeDetector(SpikeSpec(window=8, threshold=4.0))
    assert feed(detector, window) == []
    mean, std = float(np.mean(window)), float(np.std(window))  # population std, as documented
    below = mean + 3.999 * std
    assert detector.check(9, below) is None  # not a spike: enters the window (the oldest value leaves)
    assert list(detector.window) == [*window[1:], below]
    shifted = [*window[1:], below]
    mean2, std2 = float(np.mean(shifted)), float(np.std(shifted))
    spike = detector.check(10, mean2 + 4.001 * std2)
    assert spike is not None and spike.step == 10 and spike.kind == "zscore"
    assert spike.mean == pytest.approx(mean2, rel=1e-12) and spike.std == pytest.approx(std2, rel=1e-12)
    assert spike.score == pytest.approx(4.001, rel=1e-9)
    assert list(detector.window) == shifted  # a spike never enters the window
    assert detector.check(11, mean2 + 3.99 * std2) is None


def test_ratio_to_the_running_mean() -> None:
    detector = SpikeDetector(SpikeSpec(window=4, kind="ratio", threshold=2.0))
    assert feed(detector, [1.0, 2.0, 3.0, 4.0]) == []  # mean 2.5
    assert detector.check(5, 5.0) is None  # ratio exactly 2 is not above it; 5.0 enters, mean now 3.5
    spike = detector.check(6, 7.01)
    assert spike is not None and spike.score == pytest.approx(7.01 / 3.5) and spike.data()["ratio"] == spike.score
    assert "std" not in spike.data()


def test_a_flat_window_flags_nothing_and_the_state_round_trips() -> None:
    detector = SpikeDetector(SpikeSpec(window=3))
    assert feed(detector, [2.0, 2.0, 2.0, 50.0]) == []  # zero spread: no z-score
    detector.record(4, "skip")
    detector.record(6, "warn")
    resumed = SpikeDetector(SpikeSpec(window=3))
    resumed.load_state_dict(detector.state_dict())
    assert list(resumed.window) == list(detector.window) and resumed.skipped == [4]
    assert resumed.flagged == [(4, "skip"), (6, "warn")]
    empty = SpikeDetector(SpikeSpec(window=3))
    empty.load_state_dict(None)  # a checkpoint from before spike detection
    assert list(empty.window) == [] and empty.flagged == []


def test_the_spec_refuses_a_ratio_that_flags_the_mean_itself() -> None:
    with pytest.raises(ValidationError, match="ratio above 1"):
        SpikeSpec(kind="ratio", threshold=1.0)
    with pytest.raises(ValidationError):
        SpikeSpec(window=1)
