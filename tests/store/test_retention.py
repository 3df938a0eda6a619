"""Retention of committed checkpoints (trinity.store.checkpoint_commit: retained_steps, prune_checkpoints):
the newest always, the last keep_last, every multiple of keep_every, every protected step; nothing else.

The rule is checked on worked examples and, as properties over random step sets, against its own
statement; prune_checkpoints against real committed checkpoints on disk. (The run of a real node with
a policy: tests/nodes/test_async_checkpoint.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.store.checkpoint import save_checkpoint
from trinity.store.checkpoint_commit import (
    MARKER,
    claimed,
    list_checkpoints,
    prune_checkpoints,
    retained_steps,
    temporary_name,
)


@pytest.mark.parametrize(
    ("steps", "keep_last", "keep_every", "protected", "kept"),
    [
        ([10, 20, 30, 40, 50], 2, None, (), {40, 50}),
        ([10, 20, 30, 40, 50], 2, 20, (), {20, 40, 50}),
        ([10, 20, 30, 40, 50], 1, 25, (10,), {10, 50}),
        ([3, 6, 9, 10], 2, 6, (), {6, 9, 10}),  # 10: the final step, off the cadence
        ([5], 1, None, (), {5}),
        ([5, 7], 0, None, (), {5, 7}),  # keep_last <= 0 keeps all
        ([], 2, 10, (4,), set()),
        ([10, 20, 30], 2, None, (99,), {20, 30}),  # a protected step that was never committed changes nothing
    ],
)
def test_worked_examples(
    steps: list[int], keep_last: int, keep_every: int | None, protected: tuple[int, ...], kept: set[int]
) -> None:
    assert retained_steps(steps, keep_last, keep_every=keep_every, protected=frozenset(protected)) == kept


@settings(max_examples=300, deadline=None)
@given(
    st.sets(st.integers(1, 400), max_size=30),
    st.integers(1, 6),
    st.none() | st.integers(1, 50),
    st.frozensets(st.integers(1, 400), max_size=5),
)
def test_the_rule_as_stated(steps: set[int], keep_last: int, keep_every: int | None, protected: frozenset[int]) -> None:
    kept = retained_steps(sorted(steps, reverse=True), keep_last, keep_every=keep_every, protected=protected)
    ordered = sorted(steps)
    assert kept <= steps
    if ordered:
        assert ordered[-1] in kept  # the newest committed one, always
    assert set(ordered[-keep_last:]) <= kept
    for s in steps - kept:  # whatever goes is none of the kept kinds
        assert s not in ordered[-keep_last:] and s not in protected
        assert keep_every is None or s % keep_every != 0


def test_prune_keeps_exactly_the_declared_set_on_disk(tmp_path: Path) -> None:
    for step in (4, 8, 12, 16, 20, 24, 27):
        save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step))}, keep_last=0)
    writing = tmp_path / temporary_name(30)  # a save of this process in flight (claimed): never touched
    writing.mkdir()
    with claimed(writing):
        removed = prune_checkpoints(tmp_path, 2, keep_every=8, protected=frozenset({12}))
    left = [c.step for c in list_checkpoints(tmp_path)]
    assert left == [8, 12, 16, 24, 27]
    assert {p.name for p in removed} == {"step-00000004", "step-00000020"}
    assert all((tmp_path / f"step-{s:08d}" / MARKER).is_file() for s in left)
    assert writing.is_dir()


def test_save_checkpoint_passes_the_policy_through(tmp_path: Path) -> None:
    for step in range(1, 8):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, keep_last=2, keep_every=3, protected=frozenset({1}))
    assert [c.step for c in list_checkpoints(tmp_path)] == [1, 3, 6, 7]
