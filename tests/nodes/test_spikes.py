"""Loss-spike handling on the micro graph's pretraining node, with a spike injected on purpose
(execution.inject, allowed by TRINITY_ALLOW_INJECT=1): warn, skip and rollback as a user runs them,
checked against the uninterrupted run of the same spec without a spike, against the checkpoints around
the skipped step, and (rollback) against a run killed and resumed after the rollback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cli_runs import NODE, losses, run_until_step, trinity
from tests.conftest import ROOT, compose
from trinity.graph.compile import compile_graph
from trinity.run.layout import RunDir, read_json
from trinity.run.status import NodeStatus, list_attempts
from trinity.spec.loading import load_experiment
from trinity.store.checkpoint import load_checkpoint

SPIKE = 13
FACTOR = 50.0


@pytest.fixture
def allow_inject(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRINITY_ALLOW_INJECT", "1")


def spiked_graph(tmp_path: Path, action: str, every: int = 10, **stability: Any) -> Path:
    """The micro graph with a spike injected at step SPIKE and caught by a ratio rule on a 5-loss window."""
    return compose(
        tmp_path / f"{action}.yaml",
        "micro.yaml",
        stability={"spikes": {"kind": "ratio", "threshold": 3.0, "window": 5, "action": action}, **stability},
        execution={
            "checkpoint": {"every": every, "keep_last": 100},
            "inject": {"spike_at_step": SPIKE, "spike_factor": FACTOR},
        },
    )


def events(run: Path, kind: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(step, attempt, data) of NODE's events of `kind` in the telemetry views, through `trinity sql`."""
    query = f"select step, attempt, data from events where node = '{NODE}' and kind = '{kind}' order by step"
    result = trinity("sql", str(run), query, "--format", "json")
    assert result.returncode == 0, result.stderr
    return [(r["step"], r["attempt"], json.loads(r["data"])) for r in json.loads(result.stdout)]


def stop_at(graph: Path, run: Path, step: int) -> None:
    """Run NODE until it reports `step`, then Ctrl-C: it stops at a committed checkpoint, telemetry on disk."""
    proc = run_until_step(graph, run, step)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)


def test_default_spikes_keep_identities_and_an_action_changes_training_nodes() -> None:
    tiny = ROOT / "graphs" / "tiny.yaml"

    def identities(*sets: str) -> dict[str, str]:
        graph = compile_graph(load_experiment(tiny, list(sets)))
        return {n: graph.nodes[n]["node"].identity for n in graph.nodes}

    plain = identities()
    assert identities("stability.spikes.action=warn", "stability.alarms.max_vio=3.0") == plain
    skip = identities("stability.spikes.action=skip")
    changed = {n for n in plain if skip[n] != plain[n]}
    assert changed and all(n.startswith(("pretrain/", "extend", "sft", "rl", "eval/", "export/")) for n in changed)
    assert not any(n.startswith(("tokenizer", "prepare/")) for n in changed)


@pytest.mark.slow  # end to end: the micro node trained to a little past the spike
def test_warn_records_the_spike_and_trains_on(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path, allow_inject: None
) -> None:
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    stop_at(spiked_graph(tmp_path, "warn"), run, SPIKE + 2)
    got = losses(run)
    assert {s: got[s] for s in range(1, SPIKE)} == {s: straight[s] for s in range(1, SPIKE)}
    assert got[SPIKE] == pytest.approx(FACTOR * straight[SPIKE], rel=0.02)  # the injected spike, as measured
    assert max(got) >= SPIKE + 2  # training went on
    ((step, attempt, data),) = events(run, "loss_spike")
    assert (step, attempt, data["action"], data["threshold"]) == (SPIKE, 1, "warn", 3.0)
    assert data["loss"] == got[SPIKE] and data["ratio"] == pytest.approx(got[SPIKE] / data["mean"])
    mean = sum(straight[s] for s in range(SPIKE - 5, SPIKE)) / 5  # the window: the 5 losses before it
    assert data["mean"] == pytest.approx(mean, rel=1e-12)


@pytest.mark.slow  # end to end: the micro node to a little past the spike, a checkpoint each step
def test_skip_leaves_model_and_optimizer_as_before_the_step(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path, allow_inject: None
) -> None:
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    stop_at(spiked_graph(tmp_path, "skip", every=1), run, SPIKE + 1)
    ckpts = RunDir(run).node(NODE).checkpoints

    def state(step: int) -> dict[str, Any]:
        return load_checkpoint(ckpts / f"step-{step:08d}")

    before, skipped, after = state(SPIKE - 1), state(SPIKE), state(SPIKE + 1)
    for key, tensor in before["model"].items():  # weights and the expert bias (and its momentum)
        assert torch.equal(tensor, skipped["model"][key]), key
    assert flat(before["optimizer"]) == flat(skipped["optimizer"])
    assert skipped["tokens"] > before["tokens"] and skipped["loader"] != before["loader"]  # the batch is consumed
    assert any(not torch.equal(t, after["model"][k]) for k, t in skipped["model"].items())  # training goes on
    got = losses(run)
    assert {s: got[s] for s in range(1, SPIKE)} == {s: straight[s] for s in range(1, SPIKE)}
    ((step, _, data),) = events(run, "loss_spike")
    assert (step, data["action"]) == (SPIKE, "skip")
    assert NodeStatus.read(RunDir(run).node(NODE)).progress["spikes"] == 1


def flat(optimizer_state: Any) -> list[Any]:
    """The optimizer state's tensors and numbers, without the learning rates (the schedule sets each step's)."""
    out: list[Any] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                if k not in ("lr",):
                    walk(value[k], str(k))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, torch.Tensor):
            out.append(value.detach().clone())
        else:
            out.append(value)

    walk(optimizer_state)
    return [v.tolist() if isinstance(v, torch.Tensor) else v for v in out]


@pytest.mark.slow  # end to end: the node trained once with a rollback, then again killed and resumed after it
def test_rollback_restarts_from_the_checkpoint_skips_the_window_and_resumes_exactly(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path, allow_inject: None
) -> None:
    _, prepared_run = prepared
    alarms = {"max_vio": 0.05, "consecutive": 3, "bias_drift": None, "dead_experts": False}
    graph = spiked_graph(tmp_path, "rollback", alarms=alarms)
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    result = trinity("run", str(graph), "--run-dir", str(run), "--nodes", NODE)
    assert result.returncode == 0, result.stdout + result.stderr
    node_dir = RunDir(run).node(NODE)
    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["RESTART", "SUCCEEDED"] and attempts[1].resumed_from_step == 10
    (record,) = read_json(node_dir.root / "rollbacks.json")["rollbacks"]
    assert (record["spike_step"], record["to_step"], record["from_drawn"], record["skip"]) == (SPIKE, 10, 20, 6)
    ((step, attempt, spike),) = events(run, "loss_spike")  # once: the skipped window held the spike
    assert (step, attempt, spike["action"]) == (SPIKE, 1, "rollback")
    rolled = losses(run)
    assert sorted(rolled) == list(range(1, 60))  # every step once: attempt 2's rows replace attempt 1's after 10
    query = f"select attempt, min(step), max(step) from steps where node = '{NODE}' group by attempt order by attempt"
    spans = trinity("sql", str(run), query, "--format", "json")
    assert [list(r.values()) for r in json.loads(spans.stdout)] == [[1, 1, 10], [2, 11, 59]]
    assert {s: rolled[s] for s in range(1, 11)} == {s: straight[s] for s in range(1, 11)}
    assert rolled[11] != straight[11] and max(rolled.values()) < 7.0  # other data after 10; no spike
    # The MoE alarms of the same run land in SQL (3 steps of MaxVio above 0.05 from the start, per layer).
    vio = events(run, "max_vio_alarm")
    assert min(s for s, _, _ in vio) == 3 and all(d["steps"] == 3 and d["value"] > 0.05 for _, _, d in vio)

    # Killed after the rollback (past its checkpoint at 20) and resumed: nothing is skipped twice.
    killed = tmp_path / "killed"
    shutil.copytree(prepared_run, killed)
    cmd = [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(killed), "--nodes", NODE]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kdir = RunDir(killed).node(NODE)
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the node ended before it could be killed"
        status = NodeStatus.read(kdir) if kdir.status.is_file() else None
        if status is not None and status.attempt == 2 and status.progress.get("step", 0) >= 22:
            break
        time.sleep(0.02)
    os.kill(read_json(kdir.lease)["pid"], signal.SIGKILL)
    proc.wait(timeout=120)
    resumed = trinity("resume", str(killed), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert list_attempts(kdir)[-1].resumed_from_step >= 20
    assert losses(killed) == rolled  # bit for bit
    assert len(read_json(kdir.root / "rollbacks.json")["rollbacks"]) == 1
