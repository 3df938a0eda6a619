"""The post-training nodes end to end on the micro graph: every stage and eval SUCCEEDED, telemetry
in place, and SFT killed with SIGKILL mid-run then resumed gives the same losses bit for bit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.nodes.post_graph import POST_GRAPH
from trinity.run.layout import RunDir, read_json
from trinity.run.status import NodeStatus, list_attempts
from trinity.store.catalog import open_catalog

pytestmark = pytest.mark.slow


def trinity(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "trinity.cli", *args], capture_output=True, text=True, timeout=900)


PRETRAINED = ["prepare/*", "pretrain/*", "tokenizer", "extend"]
CKPT = ["--set", "execution.checkpoint_every=3"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("post")
    graph = root / "micro.yaml"
    graph.write_text(POST_GRAPH)
    run = root / "pretrained"
    nodes = [x for n in PRETRAINED for x in ("--nodes", n)]
    result = trinity("run", str(graph), "--run-dir", str(run), *nodes, *CKPT)
    assert result.returncode == 0, result.stdout + result.stderr
    return graph, run


def sft_losses(run: Path) -> dict[int, float]:
    con = open_catalog(run)
    return dict(con.sql("select step, loss from steps where node = 'sft' order by step").fetchall())


def test_every_post_training_node_succeeds(pretrained: tuple[Path, Path], tmp_path: Path) -> None:
    graph, base = pretrained
    run = tmp_path / "all"
    shutil.copytree(base, run)
    result = trinity("run", str(graph), "--run-dir", str(run), *CKPT)
    assert result.returncode == 0, result.stdout + result.stderr
    con = open_catalog(run)
    states = {n: NodeStatus.read(RunDir(run).node(n)).state for n in ("extend", "sft", "rl")}
    assert states == dict.fromkeys(states, "SUCCEEDED")
    evals = con.sql("select node, task, length, score, step from evals where node like 'eval/%'").fetchall()
    by_node = {(n, t, ln) for n, t, ln, _, _ in evals}
    assert ("eval/mk_niah@extend", "mk_niah", 128) in by_node and ("eval/mk_niah@pretrain", "mk_niah", 96) in by_node
    assert ("eval/heldout@extend", "heldout_loss/math", 64) in by_node
    assert {n for n, *_ in evals} >= {"eval/arithmetic@sft", "eval/arithmetic@rl"}
    steps = {n: s for n, _, _, _, s in evals}
    assert steps["eval/mk_niah@extend"] == 16 and steps["eval/arithmetic@sft"] == 8 and steps["eval/arithmetic@rl"] == 6
    rl = con.sql(
        "select step, (data->>'reward')::double, (data->>'response_length')::double from events "
        "where node = 'rl' and kind = 'rl' order by step"
    ).fetchall()
    assert [r[0] for r in rl] == [1, 2, 3, 4, 5, 6] and all(0 < r[2] <= 16 for r in rl)
    heldout = con.sql("select step from evals where node = 'rl' and task = 'rl_heldout' and metric = 'reward'")
    assert sorted(s for (s,) in heldout.fetchall()) == [0, 6]
    assert read_json(RunDir(run).node("eval/arithmetic@rl").outputs / "results.json")["rows"]

    from trinity.errors import NodeFailure
    from trinity.nodes.generate_cmd import generate_cli

    greedy = generate_cli(run, "rl", "What is 2 + 2?", 8, 0.0, 1.0, 0)
    assert isinstance(greedy, str) and greedy == generate_cli(run, "rl", "What is 2 + 2?", 8, 0.0, 1.0, 5)
    sampled = generate_cli(run, "extend", "The", 8, 1.0, 0.9, 3)
    assert sampled == generate_cli(run, "extend", "The", 8, 1.0, 0.9, 3)
    with pytest.raises(NodeFailure, match="training node"):
        generate_cli(run, "eval/mk_niah@extend", "x", 2, 0.0, 1.0, 0)


def test_sft_sigkill_then_resume_is_bit_identical(pretrained: tuple[Path, Path], tmp_path: Path) -> None:
    graph, base = pretrained
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run in (straight, killed):
        shutil.copytree(base, run)
    nodes = ["--nodes", "sft"]
    result = trinity("run", str(graph), "--run-dir", str(straight), *nodes, *CKPT)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = sft_losses(straight)
    assert sorted(expected) == list(range(1, 9))
    # Extension ran in both copies the same way first (a dependency of sft): same start.
    proc = subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(killed), *nodes, *CKPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    node_dir = RunDir(killed).node("sft")
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "sft ended before it could be killed"
        if node_dir.status.is_file() and NodeStatus.read(node_dir).progress.get("step", 0) >= 4:
            break
        time.sleep(0.02)
    os.kill(read_json(node_dir.lease)["pid"], signal.SIGKILL)
    proc.wait(timeout=120)
    assert NodeStatus.read(node_dir).state == "FAILED"

    resumed = trinity("resume", str(killed), "--nodes", "sft")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["FAILED", "SUCCEEDED"]
    assert attempts[1].resumed_from_step in (3, 6)
    assert sft_losses(killed) == expected


def node_losses(run: Path, node: str) -> dict[int, float]:
    con = open_catalog(run)
    return dict(con.sql(f"select step, loss from steps where node = '{node}' order by step").fetchall())


@pytest.mark.parametrize(
    ("node", "sets", "kill_at"),
    [
        # extension already ran in the fixture: a changed warmup gives it a new identity in both copies
        ("extend", ["--set", "stages.extend.lr.warmup_steps=3"], 7),
        ("rl", [], 4),
    ],
)
def test_extend_and_rl_sigkill_then_resume_are_bit_identical(
    pretrained: tuple[Path, Path], tmp_path: Path, node: str, sets: list[str], kill_at: int
) -> None:
    graph, base = pretrained
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run in (straight, killed):
        shutil.copytree(base, run)
    args = ["--nodes", node, *CKPT, *sets]
    result = trinity("run", str(graph), "--run-dir", str(straight), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = node_losses(straight, node)
    assert len(expected) > kill_at
    proc = subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(killed), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    node_dir = RunDir(killed).node(node)
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, f"{node} ended before it could be killed"
        status = NodeStatus.read(node_dir) if node_dir.status.is_file() else None
        if status is not None and status.state == "RUNNING" and status.progress.get("step", 0) >= kill_at:
            break
        time.sleep(0.02)
    os.kill(read_json(node_dir.lease)["pid"], signal.SIGKILL)
    proc.wait(timeout=120)
    resumed = trinity("resume", str(killed), "--nodes", node)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = list_attempts(node_dir)
    assert attempts[-2].state == "FAILED" and attempts[-1].state == "SUCCEEDED"
    assert attempts[-1].resumed_from_step is not None and attempts[-1].resumed_from_step >= 3
    assert node_losses(killed, node) == expected
