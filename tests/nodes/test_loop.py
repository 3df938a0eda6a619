"""The training skeleton (trinity.nodes.loop) with a toy kind: cadence, final.json, stop, exact resume.

The toy kind's step draws from torch's global RNG, so a resume is exact only if the loop restores
the RNG states with the kind's own state; its losses are compared with an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from trinity.errors import StopRequested
from trinity.nodes.checkpoints import final_state, last_committed_step
from trinity.nodes.context import StopFlag
from trinity.nodes.loop import TrainingLoop
from trinity.run.layout import NodeDir, read_json
from trinity.run.status import AttemptRecord

IDENTITY = "toy-identity"
STEPS = 7


@dataclass
class ToyStep:
    loss: float
    tokens: int


class Toy(TrainingLoop[ToyStep]):
    """A random walk: w += N(0, 1) per step; loss = w."""

    def __init__(self, ctx: Any, stop_after: int | None = None) -> None:
        super().__init__(ctx, "toy", 0, STEPS)
        self.w = torch.zeros((), dtype=torch.float64)
        self.stop_after = stop_after
        self.logged: dict[int, float] = {}
        self.committed: list[int] = []
        self.begun_at: int | None = None

    def optimizer_step(self) -> ToyStep:
        self.w += torch.randn((), dtype=torch.float64)
        if self.step + 1 == self.stop_after:
            self.ctx.stop_event.set()  # as a signal handler would, mid-step
        return ToyStep(float(self.w), 10)

    def log_step(self, result: ToyStep, seconds: float) -> None:
        assert self.telemetry is not None
        self.telemetry.log_step(self.step, tokens=self.tokens, loss=result.loss, phase=self.phase)
        self.logged[self.step] = result.loss

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": {"w": self.w.clone()}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.w = state["model"]["w"].clone()

    def begin(self) -> None:
        self.begun_at = self.step

    def end(self, last: ToyStep | None) -> dict[str, Any]:
        return {"final_w": float(self.w)}

    def checkpoint(self) -> Path:
        self.committed.append(self.step)
        return super().checkpoint()


def context(root: Path, attempt: int, identity: str = IDENTITY) -> Any:
    node_dir = NodeDir(root)
    AttemptRecord(attempt=attempt, executor="test", identity=identity).write(node_dir)
    progress: list[dict[str, Any]] = []
    return SimpleNamespace(
        spec=SimpleNamespace(execution=SimpleNamespace(checkpoint_every=3, keep_last=5, expert_load_every=10)),
        dir=node_dir,
        node=SimpleNamespace(identity=identity),
        node_id="toy",
        attempt=attempt,
        run_id="r",
        stop_event=StopFlag(),
        checks_stop=False,
        progress=lambda **values: progress.append(values),
        progress_calls=progress,
    )


def straight(root: Path) -> Toy:
    torch.manual_seed(0)
    toy = Toy(context(root, 1))
    toy.run()
    return toy


def test_cadence_final_checkpoint_and_final_json(tmp_path: Path) -> None:
    toy = straight(tmp_path)
    calls: list[dict[str, Any]] = toy.ctx.progress_calls  # type: ignore[attr-defined]
    assert toy.committed == [3, 6, 7]  # every 3 steps, and the last
    assert sorted(toy.logged) == list(range(1, STEPS + 1)) and toy.begun_at == 0
    assert toy.ctx.checks_stop
    final = read_json(toy.ctx.dir.outputs / "final.json")
    assert (final["step"], final["tokens"], final["final_w"]) == (STEPS, 10 * STEPS, toy.logged[STEPS])
    state = final_state(toy.ctx.dir)
    assert (state["step"], state["tokens"], state["identity"], state["phase"]) == (STEPS, 70, IDENTITY, "toy")
    assert {"model", "rng", "step", "tokens", "identity", "phase"} == set(state)
    assert calls[-1] == {
        "step": 7,
        "total_steps": 7,
        "loss": round(toy.logged[7], 4),
        "tokens_per_s": calls[-1]["tokens_per_s"],
        "tokens": 70,
    }
    assert list(toy.ctx.dir.telemetry(1).glob("steps-*.parquet"))  # the writer was flushed and closed
    assert toy.telemetry is None


def test_stop_checkpoints_where_it_stopped_and_the_resume_is_exact(tmp_path: Path) -> None:
    expected = straight(tmp_path / "straight").logged

    torch.manual_seed(0)
    stopped = Toy(context(tmp_path / "run", 1), stop_after=4)
    with pytest.raises(StopRequested):
        stopped.run()
    assert stopped.committed == [3, 4] and last_committed_step(stopped.ctx.dir) == 4
    assert not (stopped.ctx.dir.outputs / "final.json").exists()

    torch.manual_seed(123)  # another process: its RNG is not where the stopped one left it
    resumed = Toy(context(tmp_path / "run", 2))
    resumed.run(fresh=lambda: pytest.fail("a committed checkpoint of this identity exists"))
    assert resumed.begun_at == 4 and resumed.committed == [6, 7]
    assert AttemptRecord.read(resumed.ctx.dir, 2).resumed_from_step == 4
    assert {**stopped.logged, **resumed.logged} == expected  # bit for bit


def test_a_checkpoint_of_another_identity_is_not_resumed(tmp_path: Path) -> None:
    straight(tmp_path)
    fresh_calls: list[int] = []

    def fresh() -> tuple[int, int]:
        fresh_calls.append(1)
        return 5, 500  # e.g. the previous pretraining phase's step and tokens

    toy = Toy(context(tmp_path, 2, identity="changed"))
    toy.run(fresh)
    assert fresh_calls == [1] and sorted(toy.logged) == [6, 7] and toy.committed == [6, 7]
    assert AttemptRecord.read(toy.ctx.dir, 2).resumed_from_step is None
    assert read_json(toy.ctx.dir.outputs / "final.json")["tokens"] == 520


def test_resumed_at_the_last_step_it_only_writes_the_end(tmp_path: Path) -> None:
    """Killed after the final checkpoint, before final.json: the next attempt trains nothing."""
    first = straight(tmp_path)
    (first.ctx.dir.outputs / "final.json").unlink()
    again = Toy(context(tmp_path, 2))
    again.run()
    assert again.logged == {} and again.begun_at == STEPS and again.committed == [STEPS]
    final = read_json(again.ctx.dir.outputs / "final.json")
    assert (final["step"], final["tokens"], final["final_w"]) == (STEPS, 70, first.logged[STEPS])
