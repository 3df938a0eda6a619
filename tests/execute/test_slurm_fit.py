"""Slurm jobs that fit the cluster, and jobs that can never start.

Against the real local cluster (scripts/slurm-local.sh up; 4 CPU slots on one node): the README's
command asks for what the default partition offers, an explicit request beyond it is refused before
anything is submitted, and a job Slurm keeps pending for a reason that never clears fails its node
with that reason while its dependants become DEP_FAILED, in bounded time. The parsing of sinfo's
answer and the fitting rules are checked without a cluster.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from tests.cli_runs import sigint_as_ctrl_c
from tests.conftest import ROOT
from tests.execute.conftest import require_slurm_cluster
from trinity.errors import RunError, SpecError
from trinity.execute import slurm
from trinity.execute.commands import dry_run, run_graph
from trinity.execute.slurm_cluster import Cluster, Partition, fit_resources, parse_gpus, parse_minutes, parse_sinfo
from trinity.execute.slurm_queue import JobState, expand_ids, never_starts, query_jobs
from trinity.spec.loading import load_experiment

TINY = ROOT / "graphs" / "tiny.yaml"
IMPOSSIBLE = "execution.slurm.extra_sbatch={ntasks_per_node: '8'}"
"""8 tasks of a node on a partition whose node has 4 CPUs: sbatch accepts it, Slurm never starts it."""
TEST_NEVER_GRACE_S = 2 * slurm.POLL_S
"""The never-start grace of the in-process watcher tests: two polls, the least the watcher allows (20 s for users)."""


# -- without a cluster ---------------------------------------------------------------------------------


def test_sinfo_lines_become_partitions_with_their_largest_node() -> None:
    out = "\n".join(
        [
            "gpu*|g1|64|512000|gpu:h200:8(S:0-1)|48|2-00:00:00|1-infinite",
            "gpu*|g2|96|1024000|gpu:h200:4,gpu:a100:2|48|2-00:00:00|1-infinite",
            "cpu|c1|4|23081|(null)|UNLIMITED|30:00|1-1",
            "cpu|c2|8|23081|(null)|UNLIMITED|30:00|1-1",
        ]
    )
    partitions, default = parse_sinfo(out)
    assert default == "gpu"
    assert partitions["gpu"] == Partition("gpu", 48, 1024000, 8, 2, 48 * 60)  # MaxCPUsPerNode 48 wins over 96
    assert partitions["cpu"] == Partition("cpu", 8, 23081, 0, 1, 30)  # job size 1-1: one node


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("infinite", None), ("30", 30), ("30:00", 30), ("2:00:00", 120), ("1-00:00:00", 1440), ("1-12", 2160)],
)
def test_slurm_time_limits_in_minutes(text: str, minutes: int | None) -> None:
    assert parse_minutes(text) == minutes


def test_gres_gpus_are_counted() -> None:
    assert parse_gpus("(null)") == 0
    assert parse_gpus("gpu:h200:8(S:0-1)") == 8
    assert parse_gpus("gpu:4,shard:8,gpu:a100:2(S:0,1)") == 6


def test_never_starting_reasons_are_told_from_waiting_ones() -> None:
    never = ["PartitionConfig", "BadConstraints", "PartitionTimeLimit", "QOSMaxCpuPerJobLimit", "AssocMaxGRESPerNode"]
    waiting = ["Resources", "Priority", "Dependency", "BeginTime", "AssocGrpCpuLimit", "QOSMaxJobsPerUserLimit"]
    assert all(never_starts(r) for r in never)
    assert not any(never_starts(r) for r in waiting)
    assert expand_ids("120_[0-2,5%4]") == ["120_0", "120_1", "120_2", "120_5"]


SMALL = Partition("debug", cpus_per_node=4, mem_mb=23081, gpus_per_node=0, nodes=1, max_time_min=60)


def test_defaults_are_capped_by_the_partition_and_explicit_values_beyond_it_refused(tmp_path: Path) -> None:
    spec = load_experiment(TINY, ["execution.executor=slurm"]).spec
    assert fit_resources("tokenizer", spec, SMALL) == {"nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 4, "time": 60}
    assert fit_resources("prepare", spec, SMALL)["cpus_per_task"] == 4
    assert fit_resources("prepare", spec, None)["cpus_per_task"] == 16  # nothing known: what the kind can use
    four_ranks = load_experiment(ROOT / "graphs" / "tiny-distributed.yaml", []).spec
    assert fit_resources("pretrain", four_ranks, SMALL)["ntasks_per_node"] == 4
    assert fit_resources("pretrain", four_ranks, SMALL)["cpus_per_task"] == 1
    assert fit_resources("eval", four_ranks, SMALL)["ntasks_per_node"] == 1  # evals run as one process
    with pytest.raises(SpecError, match=re.escape("parallel.gpus_per_node = 4: node kind 'pretrain' runs 4 tasks")):
        fit_resources("pretrain", four_ranks, replace(SMALL, cpus_per_node=2))
    for setting, field in [
        ("execution.slurm.cpus_per_task=64", "execution.slurm.cpus_per_task = 64"),
        ("execution.slurm.mem_gb=64", "execution.slurm.mem_gb = 64"),
        ("execution.slurm.time_min={default: 90}", "execution.slurm.time_min.default = 90"),
    ]:
        bad = load_experiment(TINY, [setting]).spec
        with pytest.raises(SpecError) as caught:
            fit_resources("pretrain", bad, SMALL)
        assert field in str(caught.value) and "partition 'debug' offers 4 CPUs, 23081 MB" in str(caught.value)


def test_a_partition_the_cluster_lacks_is_refused_by_a_run_and_left_unfitted_by_a_dry_run() -> None:
    cluster = Cluster({"debug": SMALL}, default="debug")
    spec = load_experiment(TINY, ["execution.slurm.partition=gpu"]).spec
    with pytest.raises(SpecError, match=re.escape("execution.slurm.partition = 'gpu': the cluster has no such")):
        cluster.partition(spec)
    assert cluster.partition(spec, strict=False) is None
    assert cluster.partition(load_experiment(TINY, []).spec) == SMALL  # none named: the default one
    assert Cluster(problem="sinfo is not on PATH").partition(spec) is None


# -- on the local cluster ------------------------------------------------------------------------------


@pytest.fixture
def cluster() -> None:
    require_slurm_cluster()


def node_cpus() -> int:
    """CPUs of the default partition's largest node, as scontrol (not sinfo) reports them."""
    out = subprocess.run(["scontrol", "-o", "show", "nodes"], capture_output=True, text=True, timeout=30).stdout
    return max(int(m) for m in re.findall(r"CPUTot=(\d+)", out))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A copy of the repository's graphs/, specs/ and pyproject.toml (the project root `use:` stays within), the
    working directory of a user's `trinity run`; every job the run submitted is cancelled afterwards."""
    shutil.copytree(ROOT / "graphs", tmp_path / "graphs")
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    yield tmp_path
    for jobs in tmp_path.glob("runs/*/slurm_jobs.json"):
        ids = list(json.loads(jobs.read_text()).values())
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def cli(project: Path, *args: str) -> subprocess.Popen[str]:
    """`trinity ARGS` as typed in `project` (this checkout's trinity, whatever is installed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_ctrl_c,
    )


def finish(proc: subprocess.Popen[str], seconds: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"still running after {seconds:.0f} s:\n{out[-3000:]}")
    return proc.returncode, out


def live_jobs(ids: list[str]) -> list[str]:
    """The jobs among `ids` still pending or running (squeue)."""
    out = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True, text=True, timeout=60
    ).stdout
    return [line for line in out.splitlines() if line.split()[1] in ("PENDING", "RUNNING", "CONFIGURING")]


@pytest.mark.slurm
def test_dry_run_of_the_readme_command_asks_for_what_the_partition_has(cluster: None, project: Path) -> None:
    code, out = finish(cli(project, "run", "graphs/tiny.yaml", "--executor", "slurm", "--dry-run"), 60)
    assert code == 0, out
    _, rows = dry_run(project / "graphs" / "tiny.yaml", ["execution.executor=slurm"])
    cpus = node_cpus()
    asks = {r["node"]: r["cpus_per_task"] * r["ntasks_per_node"] for r in rows}
    assert all(n <= cpus for n in asks.values()), (cpus, asks)
    assert asks["tokenizer"] == min(8, cpus)  # capped, not shrunk further than the node needs


@pytest.mark.slurm
def test_explicit_cpus_beyond_the_partition_are_refused_before_anything_is_submitted(
    cluster: None, project: Path
) -> None:
    setting = "execution.slurm.cpus_per_task=64"
    proc = cli(project, "run", "graphs/tiny.yaml", "--executor", "slurm", "--set", setting)
    code, out = finish(proc, 90)
    assert code == 2, out
    assert "execution.slurm.cpus_per_task = 64" in out and f"offers {node_cpus()} CPUs" in out, out
    assert not list(project.glob("runs/*/slurm_jobs.json")), "nothing may be submitted"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_slurm_never_starts_fails_its_node_with_the_reason_and_its_dependants(
    cluster: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In process, as `trinity run graphs/tiny.yaml --executor slurm --nodes prepare/phase1 --set IMPOSSIBLE`
    # runs it, with the never-start grace at two polls (TEST_NEVER_GRACE_S) instead of 20 s.
    monkeypatch.setattr(slurm, "NEVER_GRACE_S", TEST_NEVER_GRACE_S)
    monkeypatch.chdir(project)
    sets = ["execution.executor=slurm", IMPOSSIBLE]
    start = time.monotonic()
    code = run_graph(Path("graphs/tiny.yaml"), sets, None, Console(file=io.StringIO()), ["prepare/phase1"])
    assert code == 1
    assert time.monotonic() - start < 120
    run = project / "runs" / "tiny"
    jobs: dict[str, str] = json.loads((run / "slurm_jobs.json").read_text())
    status = {n: json.loads((run / "nodes" / n / "status.json").read_text()) for n in jobs}
    tokenizer = status["tokenizer"]
    assert tokenizer["state"] == "FAILED", tokenizer
    assert tokenizer["message"].startswith(f"Slurm will never start job {jobs['tokenizer']}: reason PartitionConfig")
    assert status["prepare/phase1"]["state"] == "DEP_FAILED", status["prepare/phase1"]
    assert live_jobs(list(jobs.values())) == []


@pytest.mark.slurm
@pytest.mark.slow
def test_the_watcher_survives_slurm_calls_that_fail_and_ends(
    cluster: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first squeue calls time out for real (a 1 ms limit): the watcher polls again and still ends."""
    calls: list[dict[str, JobState] | None] = []

    def flaky(job_ids: list[str], timeout_s: float = 30.0) -> dict[str, JobState] | None:
        answer = query_jobs(job_ids, timeout_s=1e-3 if len(calls) < 3 else timeout_s)
        calls.append(answer)
        return answer

    monkeypatch.setattr(slurm, "query_jobs", flaky)
    monkeypatch.setattr(slurm, "NEVER_GRACE_S", TEST_NEVER_GRACE_S)
    monkeypatch.chdir(project)
    sets = ["execution.executor=slurm", IMPOSSIBLE]
    code = run_graph(Path("graphs/tiny.yaml"), sets, None, Console(file=io.StringIO()), ["tokenizer"])
    assert code == 1
    assert calls[:3] == [None, None, None] and calls[-1] is not None
    status = json.loads((project / "runs" / "tiny" / "nodes" / "tokenizer" / "status.json").read_text())
    assert "reason PartitionConfig" in status["message"]


@pytest.mark.slurm
def test_a_watcher_that_never_hears_from_slurm_gives_up(
    cluster: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slurm, "query_jobs", lambda job_ids, timeout_s=30.0: query_jobs(job_ids, timeout_s=1e-3))
    monkeypatch.setattr(slurm, "UNANSWERED_LIMIT_S", 5.0)
    monkeypatch.chdir(project)
    start = time.monotonic()
    with pytest.raises(RunError, match="Slurm did not answer"):
        run_graph(
            Path("graphs/tiny.yaml"),
            ["execution.executor=slurm", IMPOSSIBLE],
            None,
            Console(file=io.StringIO()),
            ["tokenizer"],
        )
    assert time.monotonic() - start < 60
