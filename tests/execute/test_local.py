"""The local executor: a node attempt per process, training nodes of several ranks through torchrun
(here the micro graph's pretraining node as 2 gloo ranks on the CPU, every rank a real process),
their slots against --jobs, and the layouts it refuses."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_runs import NODE, losses, run_until_step, trinity
from tests.conftest import compose
from tests.execute.conftest import TWO_RANKS
from trinity.execute.local import LocalExecutor
from trinity.execute.run import write_run
from trinity.run.layout import RunDir, read_json
from trinity.run.ranks import read_rank_ends
from trinity.run.status import NodeStatus, list_attempts
from trinity.spec.loading import load_experiment


def test_local_executor_refuses_more_than_one_machine_naming_parallel_nodes(tmp_path: Path) -> None:
    two_machines = {**TWO_RANKS, "nodes": 2, "micro_batch": 2}
    graph = compose(tmp_path / "micro.yaml", "micro.yaml", parallel=two_machines)
    assert load_experiment(graph).spec.parallel.total_ranks == 4
    result = trinity("run", str(graph), "--run-dir", str(tmp_path / "run"), "--nodes", NODE)
    assert result.returncode != 0
    assert "parallel.nodes = 2" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "nodes" / "tokenizer" / "attempts").exists()  # refused before anything ran


def test_jobs_count_a_two_rank_node_as_two_slots(two_rank_graph: Path, tmp_path: Path) -> None:
    run, _ = write_run(load_experiment(two_rank_graph), tmp_path / "run")
    executor = LocalExecutor(run)
    assert [executor.slots(n) for n in ("tokenizer", "prepare/phase1", NODE, "pretrain/phase2")] == [1, 1, 2, 2]


# -- a 2-rank node through torchrun; its telemetry written once per step ----------------------------


@pytest.mark.slow  # multi-rank: the node trained as 2 torchrun processes
def test_local_executor_runs_a_two_rank_node_through_torchrun(two_rank_run: Path) -> None:
    node_dir = RunDir(two_rank_run).node(NODE)
    assert NodeStatus.read(node_dir).state == "SUCCEEDED"
    attempts = list_attempts(node_dir)
    assert [(a.attempt, a.state, a.exit_code) for a in attempts] == [(1, "SUCCEEDED", 0)]
    ends = read_rank_ends(node_dir, 1)
    assert sorted(ends) == [0, 1] and {e.state for e in ends.values()} == {"SUCCEEDED"}
    assert ends[0].pid != ends[1].pid
    assert attempts[0].pid == ends[0].pid == read_json(node_dir.lease)["pid"]  # rank 0 holds the record and lease
    log = node_dir.log_file(1).read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" in log
    assert f"rank 0 of 2 on {ends[0].host} (pid {ends[0].pid})" in log
    assert f"rank 1 of 2 on {ends[1].host} (pid {ends[1].pid})" in log
    lines = [line for line in log.splitlines() if line.startswith("[rank ")]
    assert (
        f"[rank 0] trinity: {NODE}: step 59/59, loss " in log
        and f"[rank 0] trinity: {NODE} attempt 1: SUCCEEDED" in log
    )
    assert {line[:8] for line in lines} == {"[rank 0]", "[rank 1]"}  # every rank's lines, each with its rank


@pytest.mark.slow  # multi-rank: the node trained as 2 torchrun processes
def test_telemetry_of_a_two_rank_node_has_each_step_once(two_rank_run: Path, straight: dict[int, float]) -> None:
    sql = trinity(
        "sql",
        str(two_rank_run),
        f"SELECT step, count(*) AS n, min(loss) AS loss FROM steps_history WHERE node = '{NODE}' "
        "GROUP BY step ORDER BY step",
        "--format",
        "json",
    )
    assert sql.returncode == 0, sql.stderr
    rows = json.loads(sql.stdout)
    assert [r["step"] for r in rows] == sorted(straight)  # the same steps as one process trains
    assert {r["n"] for r in rows} == {1}  # one writer: each step exactly once, even in the history
    # The 2 ranks train the single-process model (same init, data and global batch) up to reduction order.
    two = losses(two_rank_run)
    assert abs(two[1] - straight[1]) < 1e-3 * abs(straight[1])
    assert two[max(two)] < two[1] - 2.0


# -- a 2-rank node interrupted twice: Ctrl-C, then a rank killed --------------------------------------


@dataclass(frozen=True)
class Interrupted:
    """What each leg of the `interrupted` run left: `trinity run`'s exit code and output, and the node status."""

    run: Path
    ctrl_c: tuple[int, str]
    after_ctrl_c: NodeStatus
    kill: tuple[int, str]
    after_kill: NodeStatus
    resumed: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def interrupted(
    prepared: tuple[Path, Path], two_rank_graph: Path, tmp_path_factory: pytest.TempPathFactory
) -> Interrupted:
    """One 2-rank run of the node, interrupted twice (the Ctrl-C and the rank-kill tests check one leg each, and
    the end of both): Ctrl-C at step 10; `trinity run` again, its rank 1 killed with SIGKILL at step 25 (past
    the checkpoint at 20); `trinity resume` to the end."""
    _, prepared_run = prepared
    run = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(prepared_run, run)
    node_dir = RunDir(run).node(NODE)

    proc = run_until_step(two_rank_graph, run, 10, timeout_s=600)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    ctrl_c, after_ctrl_c = (proc.returncode, out), NodeStatus.read(node_dir)

    proc = run_until_step(two_rank_graph, run, 25, timeout_s=600)
    pids = re.findall(r"rank 1 of 2 on \S+ \(pid (\d+)\)", node_dir.log_file(2).read_text())
    os.kill(int(pids[0]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    kill, after_kill = (proc.returncode, out), NodeStatus.read(node_dir)

    resumed = trinity("resume", str(run), "--nodes", NODE)
    return Interrupted(run, ctrl_c, after_ctrl_c, kill, after_kill, resumed)


@pytest.mark.slow  # multi-rank: the node trained as 2 torchrun processes
def test_ctrl_c_stops_every_rank_at_a_checkpoint_and_resume_is_exact(
    interrupted: Interrupted, two_rank_run: Path
) -> None:
    """SIGINT to `trinity run` -> SIGTERM to torchrun -> every rank: they commit a checkpoint, exit 3 (STOPPED)."""
    code, out = interrupted.ctrl_c
    assert code != 0, out
    node_dir = RunDir(interrupted.run).node(NODE)
    first, second, *_ = list_attempts(node_dir)
    assert (first.state, first.exit_code, first.signal) == ("STOPPED", 3, None)
    ends = read_rank_ends(node_dir, 1)
    assert {r: e.state for r, e in ends.items()} == {0: "STOPPED", 1: "STOPPED"}  # the signal reached both ranks
    message = interrupted.after_ctrl_c.message
    assert "stopped on request; last committed checkpoint at step" in message
    assert second.resumed_from_step == int(message.rsplit(" ", 1)[-1]) and second.resumed_from_step >= 10

    assert interrupted.resumed.returncode == 0, interrupted.resumed.stdout + interrupted.resumed.stderr
    assert list_attempts(node_dir)[-1].state == "SUCCEEDED"
    assert losses(interrupted.run) == losses(two_rank_run)  # the same 2-rank losses, bit for bit


@pytest.mark.slow  # multi-rank: the node trained as 2 torchrun processes
def test_killing_rank_1_fails_the_attempt_and_resume_finishes_with_each_step_once(interrupted: Interrupted) -> None:
    """A rank that dies ends the attempt FAILED (torchrun tears the other down); resume continues."""
    code, out = interrupted.kill
    assert code == 1, out
    node_dir = RunDir(interrupted.run).node(NODE)
    killed = list_attempts(node_dir)[1]
    assert killed.state == "FAILED" and killed.signal == signal.SIGKILL
    assert "rank 1 killed by signal SIGKILL" in interrupted.after_kill.message

    resumed = interrupted.resumed
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["STOPPED", "FAILED", "SUCCEEDED"]
    assert attempts[2].resumed_from_step is not None and attempts[2].resumed_from_step >= 20
    counts = trinity(
        "sql",
        str(interrupted.run),
        f"SELECT step, count(*) AS n FROM steps WHERE node = '{NODE}' GROUP BY step",
        "--format",
        "json",
    )
    rows = json.loads(counts.stdout)
    assert len(rows) == 59 and {r["n"] for r in rows} == {1}
