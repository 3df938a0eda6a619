"""Training nodes as multi-process torch.distributed jobs: the rendezvous from torchrun's or Slurm's
environment, the local executor through torchrun, Slurm as one job of several tasks, and telemetry
written once per step.

The launch tests run a pretraining node of the micro graph as 2 ranks (HSDP 1 x 2, experts over 2
ranks) with gloo on the CPU; every rank is a real process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.execute.conftest import MICRO_GRAPH, NODE, losses, run_until_step, trinity
from trinity.distributed.env import DistEnv, dist_env, expand_tasks_per_node, first_host, first_host_of, slurm_port
from trinity.execute.local import LocalExecutor
from trinity.execute.run import write_run
from trinity.run.layout import RunDir, read_json
from trinity.run.ranks import read_rank_ends
from trinity.run.status import AttemptRecord, NodeStatus, list_attempts
from trinity.spec.loading import load_experiment

TWO_RANKS = (
    "parallel: {nodes: 1, gpus_per_node: 2, fsdp_group: 2, ep: 2, micro_batch: 4,\n"
    "           accelerator: {name: cpu, peak_bf16_tflops: 0.2, memory_gib: 24}}\n"
)
ONE_RANK = (
    "parallel: {nodes: 1, gpus_per_node: 1, fsdp_group: 1, ep: 1, micro_batch: 4,\n"
    "           accelerator: {name: cpu, peak_bf16_tflops: 0.2, memory_gib: 24}}\n"
)


def rows_per_step(run: Path) -> dict[int, int]:
    """step -> rows of the node's current telemetry, through `trinity sql` as a user reads it."""
    query = f"SELECT step, count(*) AS n FROM steps WHERE node = '{NODE}' GROUP BY step"
    result = trinity("sql", str(run), query, "--format", "json")
    assert result.returncode == 0, result.stderr
    return {r["step"]: r["n"] for r in json.loads(result.stdout)}


# -- (a) the rendezvous from the launcher's environment ------------------------------------------


def test_dist_env_reads_torchrun_variables() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29411",
        # torchrun's variables win over Slurm's (torchrun started inside a Slurm job)
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "5",
    }
    assert dist_env(env) == DistEnv(3, 8, 1, 2, "10.0.0.7", 29411)
    assert not dist_env(env).is_primary


def test_dist_env_reads_slurm_variables_of_a_multi_task_job() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "123456",
    }
    got = dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (5, 8, 1, 4)
    assert got.master_addr == "gpu007"
    assert got.master_port == 20000 + 123456 % 20000 == slurm_port("123456")
    assert got.torchrun_variables() == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(got.master_port),
    }
    # SLURM_NTASKS_PER_NODE (set with --ntasks-per-node) is read first
    assert dist_env({**env, "SLURM_NTASKS_PER_NODE": "2"}).local_world_size == 2


def test_dist_env_without_a_launcher_is_one_process() -> None:
    assert dist_env({"PATH": "/bin"}) == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500)
    assert dist_env({}).is_primary


def test_slurm_lists_expand_as_slurm_writes_them() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    assert first_host_of("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host_of("node12,node3") == "node12"
    assert first_host_of("vm") == "vm"
    if shutil.which("scontrol"):  # the same answer as Slurm's own expansion (no controller needed)
        for nodelist in ("gpu[003-005,9],cpu1", "a[1-2]b", "node12,node3"):
            assert first_host(nodelist) == first_host_of(nodelist) or nodelist == "a[1-2]b"
    with pytest.raises(ValueError, match="tasks per node"):
        expand_tasks_per_node("2(x)")


# -- the layout checks ---------------------------------------------------------------------------


def test_local_executor_refuses_more_than_one_machine_naming_parallel_nodes(tmp_path: Path) -> None:
    graph = tmp_path / "micro.yaml"
    two_machines = TWO_RANKS.replace("nodes: 1", "nodes: 2").replace("micro_batch: 4", "micro_batch: 2")
    graph.write_text(MICRO_GRAPH.replace(ONE_RANK, two_machines))
    assert load_experiment(graph).spec.parallel.total_ranks == 4
    result = trinity("run", str(graph), "--run-dir", str(tmp_path / "run"), "--nodes", NODE)
    assert result.returncode != 0
    assert "parallel.nodes = 2" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "nodes" / "tokenizer" / "attempts").exists()  # refused before anything ran


def test_a_node_launched_with_the_wrong_number_of_processes_fails_with_both_numbers(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    """The entry point checks the launched world size against the spec's (here: 1 process for 2 ranks)."""
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    two = tmp_path / "two.yaml"
    two.write_text(graph.read_text().replace(ONE_RANK, TWO_RANKS))
    write_run(load_experiment(two), run)
    node_dir = RunDir(run).node(NODE)
    AttemptRecord(attempt=1, executor="local", identity="x").write(node_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE") and not k.startswith("SLURM_")}
    code = subprocess.run(
        [sys.executable, "-m", "trinity.execute.attempt", str(run), NODE, "--attempt", "1"], env=env, timeout=300
    ).returncode
    assert code == 1
    message = NodeStatus.read(node_dir).message
    assert "2 processes (parallel.nodes x parallel.gpus_per_node = 1 x 2)" in message and "launched as 1" in message


# -- (b) local executor through torchrun, (d) telemetry once per step ------------------------------


@pytest.fixture(scope="module")
def two_rank_graph(prepared: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    graph, _ = prepared
    assert ONE_RANK in graph.read_text()
    path = tmp_path_factory.mktemp("two") / "micro.yaml"
    path.write_text(graph.read_text().replace(ONE_RANK, TWO_RANKS))
    return path


@pytest.fixture(scope="module")
def two_rank_run(prepared: tuple[Path, Path], two_rank_graph: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretraining node run as 2 ranks by the local executor (tokenizer and prepare reused)."""
    _, prepared_run = prepared
    run = tmp_path_factory.mktemp("local2") / "run"
    shutil.copytree(prepared_run, run)
    result = trinity("run", str(two_rank_graph), "--run-dir", str(run), "--nodes", NODE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 node(s) to run, 2 reused" in result.stdout  # parallel is not part of any identity
    return run


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


def test_killing_rank_1_fails_the_attempt_and_resume_finishes_with_each_step_once(
    prepared: tuple[Path, Path], two_rank_graph: Path, tmp_path: Path
) -> None:
    """A rank that dies ends the attempt FAILED (torchrun tears the other down); resume continues."""
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    proc = run_until_step(two_rank_graph, run, 25, timeout_s=600)  # past the first checkpoint (step 20)
    node_dir = RunDir(run).node(NODE)
    pids = re.findall(r"rank 1 of 2 on \S+ \(pid (\d+)\)", node_dir.log_file(1).read_text())
    os.kill(int(pids[0]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    [first] = list_attempts(node_dir)
    assert first.state == "FAILED" and first.signal == signal.SIGKILL
    assert "rank 1 killed by signal SIGKILL" in NodeStatus.read(node_dir).message

    resumed = trinity("resume", str(run), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["FAILED", "SUCCEEDED"]
    assert attempts[1].resumed_from_step is not None and attempts[1].resumed_from_step >= 20
    counts = trinity(
        "sql",
        str(run),
        f"SELECT step, count(*) AS n FROM steps WHERE node = '{NODE}' GROUP BY step",
        "--format",
        "json",
    )
    rows = json.loads(counts.stdout)
    assert len(rows) == 59 and {r["n"] for r in rows} == {1}


def test_ctrl_c_stops_every_rank_at_a_checkpoint_and_resume_is_exact(
    prepared: tuple[Path, Path], two_rank_graph: Path, two_rank_run: Path, tmp_path: Path
) -> None:
    """SIGINT to `trinity run` -> SIGTERM to torchrun -> every rank: they commit a checkpoint, exit 3 (STOPPED)."""
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    proc = run_until_step(two_rank_graph, run, 10, timeout_s=600)
    node_dir = RunDir(run).node(NODE)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    [first] = list_attempts(node_dir)
    assert (first.state, first.exit_code, first.signal) == ("STOPPED", 3, None)
    ends = read_rank_ends(node_dir, 1)
    assert {r: e.state for r, e in ends.items()} == {0: "STOPPED", 1: "STOPPED"}  # the signal reached both ranks
    assert "stopped on request; last committed checkpoint at step" in NodeStatus.read(node_dir).message

    resumed = trinity("resume", str(run), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    second = list_attempts(node_dir)[1]
    assert second.state == "SUCCEEDED" and second.resumed_from_step is not None and second.resumed_from_step >= 10
    assert losses(run) == losses(two_rank_run)  # the same 2-rank losses, bit for bit


# -- the scheduler counts a node's processes against --jobs ---------------------------------------


def test_jobs_count_a_two_rank_node_as_two_slots(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    graph, _ = prepared
    two = tmp_path / "two.yaml"
    two.write_text(graph.read_text().replace(ONE_RANK, TWO_RANKS))
    run, _ = write_run(load_experiment(two), tmp_path / "run")
    executor = LocalExecutor(run)
    assert [executor.slots(n) for n in ("tokenizer", "prepare/phase1", NODE, "pretrain/phase2")] == [1, 1, 2, 2]


# -- (c) Slurm: one job of 2 tasks ----------------------------------------------------------------


def _slurm_problem() -> str | None:
    if not os.environ.get("SLURM_CONF") or shutil.which("sinfo") is None:
        return "no Slurm client or SLURM_CONF (run scripts/slurm-local.sh up and export SLURM_CONF)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"sinfo failed: {probe.stderr.strip()}"
    return None


@pytest.fixture
def slurm_cluster() -> None:
    problem = _slurm_problem()
    if problem is not None:
        if os.environ.get("TRINITY_REQUIRE_SLURM") == "1":
            pytest.fail(f"TRINITY_REQUIRE_SLURM=1 but the Slurm cluster is not usable: {problem}")
        pytest.skip(problem)


SLURM = [
    "--executor",
    "slurm",
    "--set",
    "execution.slurm.cpus_per_task=1",
    "--set",
    "execution.slurm.time_min={default: 20}",
]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_runs_a_two_rank_node_as_one_job_of_two_tasks(
    prepared: tuple[Path, Path], two_rank_graph: Path, two_rank_run: Path, tmp_path: Path
) -> None:
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    result = trinity("run", str(two_rank_graph), "--run-dir", str(run), "--nodes", NODE, *SLURM)
    assert result.returncode == 0, result.stdout + result.stderr
    node_dir = RunDir(run).node(NODE)
    [attempt] = list_attempts(node_dir)  # one attempt, written by task 0
    assert attempt.state == "SUCCEEDED" and attempt.executor == "slurm" and attempt.job_id
    ends = read_rank_ends(node_dir, 1)
    assert sorted(ends) == [0, 1] and ends[0].pid != ends[1].pid
    steps = subprocess.run(
        ["sacct", "-j", attempt.job_id, "-n", "-P", "-o", "JobID,NTasks,State"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    rows = [line.split("|") for line in steps]
    assert {r[0].split(".")[0] for r in rows} == {attempt.job_id}  # one job
    assert [r[1:] for r in rows if r[0] == f"{attempt.job_id}.0"] == [["2", "COMPLETED"]]  # its step: 2 tasks
    log = node_dir.log_file(1).read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" in log
    counts = trinity(
        "sql",
        str(run),
        f"SELECT step, count(*) AS n FROM steps WHERE node = '{NODE}' GROUP BY step",
        "--format",
        "json",
    )
    assert {r["n"] for r in json.loads(counts.stdout)} == {1}
    assert losses(run) == losses(two_rank_run)  # Slurm's rendezvous trains what torchrun's does


def test_the_distributed_tiny_graph_validates_with_four_ranks() -> None:
    spec = load_experiment(ROOT / "graphs" / "tiny-distributed.yaml").spec
    par = spec.parallel
    assert (par.nodes, par.gpus_per_node, par.fsdp_group, par.ep, par.replicas) == (1, 4, 2, 2, 2)
    assert all(par.divides_batch(b.sequences) for b in spec.optim.batch)


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_preemption_signal_stops_every_task_and_the_requeued_job_resumes_exactly(
    prepared: tuple[Path, Path], two_rank_graph: Path, two_rank_run: Path, tmp_path: Path
) -> None:
    """SIGUSR2 (what Slurm sends before a time limit) reaches both tasks: the ranks stop at one checkpoint,
    task 0 requeues the job, and the requeued job's two tasks agree on the next attempt and resume."""
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
    first, second = list_attempts(node_dir)
    assert first.job_id == second.job_id == job_id  # the same job, requeued
    assert first.state == "STOPPED" and second.state == "SUCCEEDED"
    assert {r: e.state for r, e in read_rank_ends(node_dir, 1).items()} == {0: "STOPPED", 1: "STOPPED"}
    assert sorted(read_rank_ends(node_dir, 2)) == [0, 1]  # both tasks of the requeued job ran attempt 2
    assert second.resumed_from_step is not None and second.resumed_from_step >= 10
    assert set(rows_per_step(run).values()) == {1}
    assert losses(run) == losses(two_rank_run)
