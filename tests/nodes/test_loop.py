"""The training skeleton (trinity.nodes.loop) with a toy kind: cadence, final.json, stop, exact resume.

The toy kind's step draws from torch's global RNG, so a resume is exact only if the loop restores
the RNG states with the kind's own state; its losses are compared with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import pytest
import torch

import trinity.store.checkpoint as ckpt
from tests.cli_runs import NODE, losses, run_until_step, trinity
from trinity.errors import CheckpointError, StopRequested
from trinity.nodes.checkpoints import final_state, last_committed_step
from trinity.nodes.context import StopFlag
from trinity.nodes.loop import TrainingLoop
from trinity.run.layout import NodeDir, RunDir, read_json
from trinity.run.status import AttemptRecord, StepProgress, list_attempts
from trinity.spec.execution import CheckpointSpec
from trinity.store.checkpoint import load_checkpoint

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


SYNC = CheckpointSpec(every=3, keep_last=5)


def context(root: Path, attempt: int, identity: str = IDENTITY, policy: CheckpointSpec = SYNC) -> Any:
    node_dir = NodeDir(root)
    AttemptRecord(attempt=attempt, executor="test", identity=identity).write(node_dir)
    progress: list[dict[str, Any]] = []
    steps = StepProgress()  # the heartbeat's view of the steps (NodeContext.steps)
    return SimpleNamespace(
        spec=SimpleNamespace(execution=SimpleNamespace(checkpoint=policy, expert_load_every=10)),
        dir=node_dir,
        node=SimpleNamespace(identity=identity),
        graph=SimpleNamespace(nodes={}),  # no other node starts from this one
        node_id="toy",
        attempt=attempt,
        run_id="r",
        stop_event=StopFlag(),
        checks_stop=False,
        progress=lambda **values: progress.append(values),
        progress_calls=progress,
        steps=steps,
        step_done=steps.step_done,
        before_step=lambda step: None,
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
        "loss_history": [round(toy.logged[s], 4) for s in range(1, STEPS + 1)],
    }
    assert list(toy.ctx.dir.telemetry(1).glob("steps-*.parquet"))  # the writer was flushed and closed
    assert toy.telemetry is None


ASYNC = CheckpointSpec(every=3, keep_last=5, **{"async": True})


@pytest.mark.parametrize("policy", [SYNC, ASYNC], ids=["sync", "async"])
def test_stop_checkpoints_where_it_stopped_and_the_resume_is_exact(tmp_path: Path, policy: CheckpointSpec) -> None:
    expected = straight(tmp_path / "straight").logged

    torch.manual_seed(0)
    stopped = Toy(context(tmp_path / "run", 1, policy=policy), stop_after=4)
    with pytest.raises(StopRequested):
        stopped.run()
    # StopRequested is raised once the checkpoint of the step it stopped at is committed (async: waited for).
    assert stopped.committed == [3, 4] and last_committed_step(stopped.ctx.dir) == 4
    assert not (stopped.ctx.dir.outputs / "final.json").exists()

    torch.manual_seed(123)  # another process: its RNG is not where the stopped one left it
    resumed = Toy(context(tmp_path / "run", 2, policy=policy))
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


class BigToy(Toy):
    """The toy with its weight also held as a leaf of its own Zarr array (10 MB, above the 8 MiB packing threshold):
    restored from that array, so a chunk of it that loads as zeros changes the losses, silently."""

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": {"w": self.w.clone(), "big": self.w.expand(2_500_000).clone()}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.w = state["model"]["big"][0].clone()


def packed_chunk(node_dir: NodeDir, step: int, array: str = "%packed") -> Path:
    """The one chunk of an array (default: the toy's small leaves, w and the RNG states) of checkpoint `step`."""
    return node_dir.checkpoints / f"step-{step:08d}" / array / "c" / "0"


def stopped_at_6(root: Path, kind: type[Toy] = Toy) -> Toy:
    torch.manual_seed(0)
    stopped = kind(context(root, 1), stop_after=6)
    with pytest.raises(StopRequested):
        stopped.run()
    assert stopped.committed == [3, 6]
    return stopped


@pytest.mark.parametrize(("kind", "array"), [(Toy, "%packed"), (BigToy, "model/big")])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: type[Toy], array: str
) -> None:
    expected = straight(tmp_path / "straight").logged
    run = tmp_path / "run"
    stopped = stopped_at_6(run, kind)
    packed_chunk(stopped.ctx.dir, 6, array).unlink()  # the checkpoint of step 6 lost a chunk

    torch.manual_seed(123)
    resumed = kind(context(run, 2))
    resumed.run(fresh=lambda: pytest.fail("an intact committed checkpoint exists"))
    assert resumed.begun_at == 3 and resumed.committed == [6, 7]
    assert AttemptRecord.read(resumed.ctx.dir, 2).resumed_from_step == 3
    assert {**{s: v for s, v in stopped.logged.items() if s <= 3}, **resumed.logged} == expected  # bit for bit

    damaged = run / "checkpoints" / "step-00000006"
    aside = run / "checkpoints" / "step-00000006.damaged"
    chunk = packed_chunk(NodeDir(run), 6, array).relative_to(damaged)
    assert (aside / "COMMITTED").is_file() and not (aside / chunk).exists()  # kept as it was
    assert (damaged / chunk).is_file() and last_committed_step(resumed.ctx.dir) == 7  # saved anew
    log = capsys.readouterr().out
    missing = f"array {array}: chunk {chunk.relative_to(array)} is missing"
    assert f"{damaged}: {missing}" in log and "set aside as step-00000006.damaged" in log
    events = duckdb.sql(
        f"SELECT attempt, step, kind, message, data FROM read_parquet('{run}/telemetry/attempt-0002/events-*.parquet')"
    ).fetchall()
    assert len(events) == 1
    attempt, step, event, message, data = events[0]
    assert (attempt, step, event) == (2, 3, "checkpoint_damaged") and missing in message
    assert json.loads(data) == {
        "checkpoint": str(damaged), "damaged_step": 6, "set_aside": str(aside), "resumed_from_step": 3
    }  # fmt: skip


def test_with_no_intact_checkpoint_the_resume_fails_naming_the_newest_and_its_array(tmp_path: Path) -> None:
    stopped = stopped_at_6(tmp_path)
    for step in (3, 6):
        packed_chunk(stopped.ctx.dir, step).unlink()
    resumed = Toy(context(tmp_path, 2))
    with pytest.raises(CheckpointError) as exc:
        resumed.run(fresh=lambda: pytest.fail("committed checkpoints exist: the node must not start over"))
    message = str(exc.value)
    assert f"{tmp_path}/checkpoints/step-00000006: array %packed: chunk c/0 is missing" in message
    assert "the 1 older committed checkpoints are damaged too" in message and "No intact checkpoint" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


@pytest.mark.slow  # end to end: the micro graph's node trained one and a half times
def test_a_real_node_resumes_past_a_flipped_bit_exactly(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path
) -> None:
    """The issue's case: a node killed after its checkpoint of step 40, in which one bit then flips (in the
    weights: the micro model's leaves are all packed into one chunk). Without checksums the resume continued
    from slightly different weights, silently; now it falls back to step 20 and reproduces the uninterrupted
    run bit for bit. (A deleted chunk is the toy tests' case above.)"""
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    proc = run_until_step(graph, run, 45)
    node_dir = RunDir(run).node(NODE)
    os.kill(read_json(node_dir.lease)["pid"], signal.SIGKILL)
    proc.wait(timeout=120)
    step40 = node_dir.checkpoints / "step-00000040"
    chunk = max((p for p in step40.rglob("c/*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 4] ^= 0x01  # the lowest mantissa bit of a float32 of the model
    chunk.write_bytes(bytes(data))

    resumed = trinity("resume", str(run), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["FAILED", "SUCCEEDED"] and attempts[1].resumed_from_step == 20
    assert losses(run) == straight  # every step once, bit for bit
    log = node_dir.log_file(2).read_text()
    assert f"checkpoint damaged: {step40}: array " in log and "set aside as step-00000040.damaged" in log
    damaged = "SELECT step, kind, data FROM events WHERE kind = 'checkpoint_damaged'"
    events = trinity("sql", str(run), damaged, "--format", "json")
    assert events.returncode == 0, events.stderr
    (event,) = json.loads(events.stdout)
    assert event["step"] == 20 and json.loads(event["data"])["damaged_step"] == 40
    verified = trinity("verify", str(run), NODE)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"note: {step40}.damaged: set aside as damaged by a resume" in verified.stderr


# -- asynchronous checkpoints ---------------------------------------------------------------------


class InPlaceToy(Toy):
    """The toy whose checkpoint state is its live weight (no copy), changed in place by every step, as a
    model's parameters are: an asynchronous save that did not copy it would commit a later step's value."""

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": {"w": self.w}}


def test_async_checkpoints_are_written_while_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer is held (write_tree blocks in the worker thread) until step 5: steps 4 and 5 run while the
    checkpoint of step 3 is in flight, and each checkpoint still holds the weight of its own step."""
    expected = straight(tmp_path / "straight").logged
    gate = threading.Event()
    real = ckpt.write_tree

    def held(*args: Any, **kwargs: Any) -> Any:
        assert threading.current_thread() is not threading.main_thread()  # written by the worker
        assert gate.wait(timeout=30)
        return real(*args, **kwargs)

    class Held(InPlaceToy):
        def optimizer_step(self) -> ToyStep:
            if self.step + 1 == 5:
                assert last_committed_step(self.ctx.dir) is None  # step 3's save is still in flight
                gate.set()
            return super().optimizer_step()

    monkeypatch.setattr(ckpt, "write_tree", held)
    torch.manual_seed(0)
    toy = Held(context(tmp_path / "run", 1, policy=ASYNC))
    toy.run()
    assert toy.logged == expected and toy.committed == [3, 6, 7]
    for step in (3, 6, 7):
        state = load_checkpoint(toy.ctx.dir.checkpoints / f"step-{step:08d}")
        assert (state["step"], float(state["model"]["w"])) == (step, expected[step])  # the value at its step
    assert read_json(toy.ctx.dir.outputs / "final.json")["checkpoint"] == "checkpoints/step-00000007"
    events = duckdb.sql(
        f"SELECT step, data FROM read_parquet('{tmp_path}/run/telemetry/attempt-0001/events-*.parquet') "
        "WHERE kind = 'checkpoint_async' ORDER BY step"
    ).fetchall()
    assert [s for s, _ in events] == [3, 6, 7]
    assert all(set(json.loads(d)) == {"waited_s", "snapshot_s"} for _, d in events)


def test_a_failed_async_save_fails_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's error is raised in the training thread (at the next checkpoint), never lost."""

    def full(folder: Path, *args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_tree", full)
    torch.manual_seed(0)
    toy = Toy(context(tmp_path, 1, policy=ASYNC))
    with pytest.raises(OSError, match="No space left"):
        toy.run()
    assert toy.committed == [3, 6] and last_committed_step(toy.ctx.dir) is None  # raised by the save of step 6
    assert not (toy.ctx.dir.outputs / "final.json").exists()
