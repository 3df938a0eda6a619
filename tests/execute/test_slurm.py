"""The Slurm executor against the real local cluster (scripts/slurm-local.sh up; SLURM_CONF set): one job
per node with `afterok` dependencies, requeue, scancel, sweeps as arrays, and a 2-rank training node as
one job of 2 tasks.

Without a cluster these tests skip, unless TRINITY_REQUIRE_SLURM=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli_runs import NODE, losses, trinity
from tests.conftest import ROOT, compose
from tests.execute.conftest import require_slurm_cluster
from trinity.run.layout import RunDir
from trinity.run.ranks import read_rank_ends
from trinity.run.status import NodeStatus, list_attempts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SLURM = [
    "--executor",
    "slurm",
    "--set",
    "execution.slurm.cpus_per_task=1",
    "--set",
    "execution.slurm.time_min={default: 20}",
]


@pytest.fixture(autouse=True, scope="module")
def cluster() -> None:
    require_slurm_cluster()


def wait_for(predicate: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def status(run: Path) -> dict[str, str]:
    report = json.loads(trinity("status", str(run), "--json").stdout)
    return {n["id"]: n["state"] for n in report["nodes"]}


def test_tiny_graph_runs_on_slurm_one_job_per_node_with_dependencies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # One optimizer step per phase (16 sequences of 256 tokens): the jobs and their dependencies are the subject.
    shrink = [f"data.phases.phase{i}.tokens=4096" for i in (1, 2, 3)] + ["tokenizer.sample_bytes=300000"]
    sets = [a for s in shrink for a in ("--set", s)]
    result = trinity(
        "run", str(ROOT / "graphs" / "tiny.yaml"), "--run-dir", str(run), "--nodes", "pretrain/*", *SLURM, *sets
    )
    assert result.returncode == 0, result.stdout + result.stderr
    states = status(run)
    wanted = [
        "tokenizer",
        "prepare/phase1",
        "prepare/phase2",
        "prepare/phase3",
        "pretrain/phase1",
        "pretrain/phase2",
        "pretrain/phase3",
    ]
    assert all(states[n] == "SUCCEEDED" for n in wanted), states
    records = {n: list_attempts(RunDir(run).node(n))[-1] for n in wanted}
    job_ids = {n: r.job_id for n, r in records.items()}
    assert all(r.executor == "slurm" and r.job_id for r in records.values())
    assert len(set(job_ids.values())) == len(wanted)  # each node its own job
    deps = records["pretrain/phase2"].depends_on or ""
    assert f"afterok:{job_ids['prepare/phase2']}" in deps and f"afterok:{job_ids['pretrain/phase1']}" in deps
    node_dir = RunDir(run).node("pretrain/phase1")
    assert list((node_dir.root / "slurm").glob("*_submission.sh")), "the sbatch script is kept in the node folder"
    sql = trinity(
        "sql",
        str(run),
        "SELECT node, job_id, depends_on FROM attempts WHERE node = 'pretrain/phase3'",
        "--format",
        "json",
    )
    row = json.loads(sql.stdout)[0]
    assert row["job_id"] == job_ids["pretrain/phase3"] and f"afterok:{job_ids['pretrain/phase2']}" in row["depends_on"]


def test_scontrol_requeue_resumes_from_the_checkpoint_with_the_same_losses(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path
) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    submitted = trinity("run", str(graph), "--run-dir", str(run), "--nodes", NODE, "--no-wait", *SLURM)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    node_dir = RunDir(run).node(NODE)
    wait_for(lambda: NodeStatus.read(node_dir).progress.get("step", 0) >= 25, 300, "step 25")
    job_id = list_attempts(node_dir)[-1].job_id
    assert job_id
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    wait_for(
        lambda: NodeStatus.read(node_dir).state == "SUCCEEDED" and len(list_attempts(node_dir)) == 2,
        600,
        "the requeued job to finish",
    )
    first, second = list_attempts(node_dir)
    assert first.job_id == second.job_id == job_id  # the same job, requeued
    assert second.resumed_from_step is not None and second.resumed_from_step > 0
    assert losses(run) == straight


def test_scancel_fails_the_node_and_its_dependants_and_resume_reruns_exactly_those(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    submitted = trinity("run", str(graph), "--run-dir", str(run), "--nodes", "pretrain/phase2", "--no-wait", *SLURM)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    node_dir = RunDir(run).node(NODE)
    wait_for(lambda: NodeStatus.read(node_dir).progress.get("step", 0) >= 3, 300, "pretrain/phase1 to train")
    cancelled = trinity("cancel", str(run), NODE)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    wait_for(lambda: status(run)["pretrain/phase2"] == "DEP_FAILED", 120, "the dependant to be DEP_FAILED")
    states = status(run)
    assert states[NODE] == "FAILED"
    assert states["tokenizer"] == states["prepare/phase1"] == "SUCCEEDED"

    resumed = trinity("resume", str(run), "--nodes", "pretrain/phase2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "2 node(s) to run" in resumed.stdout  # pretrain/phase1 and pretrain/phase2; the rest is reused
    assert all(
        state == "SUCCEEDED"
        for node, state in status(run).items()
        if node in ("tokenizer", "prepare/phase1", "prepare/phase2", NODE, "pretrain/phase2")
    )


def test_sweep_of_three_learning_rates_is_one_array_job(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    _, prepared_run = prepared
    swept = compose(tmp_path / "sweep.yaml", "micro.yaml", sweep={"grid": {"optim.muon.lr": [0.005, 0.01, 0.02]}})
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)  # the tokenizer is shared by the branches: reused
    # 12 steps (of 8 sequences of 64 tokens) instead of 59: prepare/phase1 runs again, once for the 3 branches.
    short = ["--set", "data.phases.phase1.tokens=6000"]
    force = ["--force"]  # another graph into the copy of the prepared run: prepare/phase1 is superseded
    result = trinity("run", str(swept), "--run-dir", str(run), "--nodes", "pretrain/phase1*", *SLURM, *short, *force)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 node(s) to run" in result.stdout  # prepare/phase1 and the 3 branches
    nodes = [f"pretrain/phase1[muon.lr={lr}]" for lr in ("0.005", "0.01", "0.02")]
    records = [list_attempts(RunDir(run).node(n))[-1] for n in nodes]
    arrays = {r.job_id.split("_")[0] for r in records if r.job_id}
    assert len(arrays) == 1, [r.job_id for r in records]
    assert sorted(r.array_index for r in records if r.array_index is not None) == [0, 1, 2]
    sql = trinity(
        "sql",
        str(run),
        "SELECT s.node, p.optim__muon__lr AS lr, s.loss FROM steps s JOIN spec p "
        "USING (run_id, node) WHERE s.step = 12 ORDER BY lr",
        "--format",
        "json",
    )
    rows = json.loads(sql.stdout)
    assert [r["lr"] for r in rows] == [0.005, 0.01, 0.02]
    assert len({r["loss"] for r in rows}) == 3


# -- a training node of 2 ranks: one job of 2 tasks -------------------------------------------------


def rows_per_step(run: Path) -> dict[int, int]:
    """step -> rows of the node's current telemetry, through `trinity sql` as a user reads it."""
    query = f"SELECT step, count(*) AS n FROM steps WHERE node = '{NODE}' GROUP BY step"
    result = trinity("sql", str(run), query, "--format", "json")
    assert result.returncode == 0, result.stderr
    return {r["step"]: r["n"] for r in json.loads(result.stdout)}


def sacct(job_id: str) -> dict[str, list[str]]:
    """JobID -> [NTasks, State] of a job and its steps, as sacct reports its last run."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-n", "-P", "-o", "JobID,NTasks,State"], capture_output=True, text=True, timeout=60
    ).stdout
    return {row[0]: row[1:] for row in (line.split("|") for line in out.split())}


def test_slurm_preemption_signal_stops_every_task_and_the_requeued_job_resumes_exactly(
    prepared: tuple[Path, Path], two_rank_graph: Path, two_rank_run: Path, tmp_path: Path
) -> None:
    """A 2-rank node is one job of 2 tasks that trains what torchrun's 2 ranks do; SIGUSR2 (what Slurm sends
    before a time limit) reaches both tasks: the ranks stop at one checkpoint, task 0 requeues the job, and
    the requeued job's two tasks agree on the next attempt and resume. (One run for both subjects: the
    requeued job is the whole job's second and last run, so its step of 2 tasks completing is sacct's.)"""
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    submitted = trinity("run", str(two_rank_graph), "--run-dir", str(run), "--nodes", NODE, "--no-wait", *SLURM)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    node_dir = RunDir(run).node(NODE)
    deadline = time.monotonic() + 600
    while NodeStatus.read(node_dir).progress.get("step", 0) < 10:
        assert time.monotonic() < deadline, "timed out waiting for step 10"
        time.sleep(0.5)
    job_id = list_attempts(node_dir)[-1].job_id
    assert job_id
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    deadline = time.monotonic() + 900
    while not (NodeStatus.read(node_dir).state == "SUCCEEDED" and len(list_attempts(node_dir)) == 2):
        assert time.monotonic() < deadline, "timed out waiting for the requeued job to finish"
        time.sleep(1)
    first, second = list_attempts(node_dir)  # one record per attempt, written by task 0
    assert first.job_id == second.job_id == job_id  # the same job, requeued
    assert first.executor == second.executor == "slurm"
    assert first.state == "STOPPED" and second.state == "SUCCEEDED"
    ends = read_rank_ends(node_dir, 1)
    assert {r: e.state for r, e in ends.items()} == {0: "STOPPED", 1: "STOPPED"}
    assert ends[0].pid != ends[1].pid  # two tasks, two processes
    log = node_dir.log_file(1).read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" in log
    assert sorted(read_rank_ends(node_dir, 2)) == [0, 1]  # both tasks of the requeued job ran attempt 2
    # The node is SUCCEEDED before its job step ends: wait for Slurm's account of the job's (last) run.
    wait_for(lambda: sacct(job_id).get(job_id) == ["", "COMPLETED"], 120, "the requeued job to end")
    rows = sacct(job_id)
    assert {r.split(".")[0] for r in rows} == {job_id}  # one job
    assert rows[f"{job_id}.0"] == ["2", "COMPLETED"]  # its step: 2 tasks
    assert second.resumed_from_step is not None and second.resumed_from_step >= 10
    assert set(rows_per_step(run).values()) == {1}
    assert losses(run) == losses(two_rank_run)  # Slurm's rendezvous trains what torchrun's does, resumed exactly
