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
from trinity.run.status import AttemptRecord, NodeStatus, list_attempts
from trinity.store.catalog import open_catalog

pytestmark = pytest.mark.slow


def trinity(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "trinity.cli", *args], capture_output=True, text=True, timeout=900)


PRETRAINED = ["prepare/*", "pretrain/*", "tokenizer"]
CKPT = ["--set", "execution.checkpoint.every=3"]
"""A checkpoint every 3 steps in the post-training nodes (16 extension steps, 8 SFT, 6 RL): a kill lands after one."""

# Runs shared by the tests (module-scoped, each made once and copied by the tests that change them):
#   pretrained   tokenizer .. pretraining: the session's uninterrupted micro run (tests/conftest.py:
#                straight_run; the post-training stages leave those nodes' identities as they are, so
#                tokenizer, prepare/phase1 and pretrain/phase1 are reused) and phase 2
#   extended     pretrained + extension: the uninterrupted extension run the killed one must reproduce
#   with_sft     extended + SFT: the uninterrupted SFT run
#   everything   with_sft + every other node (RL, evals): the uninterrupted RL run, and what the
#                every-node test checks


def run_ok(graph: Path, run: Path, *args: str) -> None:
    result = trinity("run", str(graph), "--run-dir", str(run), *args)
    assert result.returncode == 0, result.stdout + result.stderr


def copy_and_run(base: Path, name: str, graph: Path, factory: pytest.TempPathFactory, *args: str) -> Path:
    """A copy of run `base` in which `trinity run GRAPH *args` succeeded."""
    run = factory.mktemp("post") / name
    shutil.copytree(base, run)
    run_ok(graph, run, *args)
    return run


@pytest.fixture(scope="module")
def pretrained(straight_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    graph = tmp_path_factory.mktemp("post") / "micro.yaml"
    graph.write_text(POST_GRAPH)
    nodes = [x for n in PRETRAINED for x in ("--nodes", n)]
    return graph, copy_and_run(straight_run, "pretrained", graph, tmp_path_factory, *nodes)


@pytest.fixture(scope="module")
def extended(pretrained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    graph, base = pretrained
    return copy_and_run(base, "extended", graph, tmp_path_factory, "--nodes", "extend", *CKPT)


@pytest.fixture(scope="module")
def with_sft(pretrained: tuple[Path, Path], extended: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    graph, _ = pretrained
    return copy_and_run(extended, "with_sft", graph, tmp_path_factory, "--nodes", "sft", *CKPT)


@pytest.fixture(scope="module")
def everything(pretrained: tuple[Path, Path], with_sft: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    graph, _ = pretrained
    return copy_and_run(with_sft, "everything", graph, tmp_path_factory, *CKPT)


def node_losses(run: Path, node: str) -> dict[int, float]:
    con = open_catalog(run)
    return dict(con.sql(f"select step, loss from steps where node = '{node}' order by step").fetchall())


def test_every_post_training_node_succeeds(everything: Path) -> None:
    run = everything
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


def kill_then_resume(graph: Path, killed: Path, node: str, kill_at: int) -> list[AttemptRecord]:
    """`trinity run --nodes NODE` in `killed`, NODE's process SIGKILLed once it reports step `kill_at`, then
    `trinity resume --nodes NODE`; returns NODE's attempts."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trinity.cli",
            "run",
            str(graph),
            "--run-dir",
            str(killed),
            "--nodes",
            node,
            *CKPT,
        ],
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
    assert NodeStatus.read(node_dir).state == "FAILED"
    resumed = trinity("resume", str(killed), "--nodes", node)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return list_attempts(node_dir)


def test_sft_sigkill_then_resume_is_bit_identical(
    pretrained: tuple[Path, Path], extended: Path, with_sft: Path, tmp_path: Path
) -> None:
    graph, _ = pretrained
    expected = node_losses(with_sft, "sft")  # the uninterrupted run, from the same extension checkpoint
    assert sorted(expected) == list(range(1, 9))
    killed = tmp_path / "killed"
    shutil.copytree(extended, killed)
    attempts = kill_then_resume(graph, killed, "sft", 4)
    assert [a.state for a in attempts] == ["FAILED", "SUCCEEDED"]
    assert attempts[1].resumed_from_step in (3, 6)
    assert node_losses(killed, "sft") == expected


def test_extend_sigkill_then_resume_is_bit_identical(
    pretrained: tuple[Path, Path], extended: Path, tmp_path: Path
) -> None:
    graph, base = pretrained
    expected = node_losses(extended, "extend")  # the uninterrupted run, from the same pretraining checkpoint
    assert len(expected) > 7
    killed = tmp_path / "killed"
    shutil.copytree(base, killed)
    attempts = kill_then_resume(graph, killed, "extend", 7)
    assert [a.state for a in attempts] == ["FAILED", "SUCCEEDED"]
    assert attempts[-1].resumed_from_step is not None and attempts[-1].resumed_from_step >= 3
    assert node_losses(killed, "extend") == expected


def test_rl_sigkill_then_resume_is_bit_identical(
    pretrained: tuple[Path, Path], with_sft: Path, everything: Path, tmp_path: Path
) -> None:
    graph, _ = pretrained
    expected = node_losses(everything, "rl")  # the uninterrupted run, from the same SFT checkpoint
    assert len(expected) > 4
    killed = tmp_path / "killed"
    shutil.copytree(with_sft, killed)
    attempts = kill_then_resume(graph, killed, "rl", 4)
    assert attempts[-2].state == "FAILED" and attempts[-1].state == "SUCCEEDED"
    assert attempts[-1].resumed_from_step is not None and attempts[-1].resumed_from_step >= 3
    assert node_losses(killed, "rl") == expected
