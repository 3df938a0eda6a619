"""The README's Slurm command, exactly as a new user types it, runs the tiny graph on the local cluster.

`trinity run graphs/tiny.yaml --executor slurm` in a copy of the repository's graphs/ and specs/ (the
run directory is runs/tiny under it, as for a user) with no override: the tokenizer and every prepare
node succeed and a pretraining node runs, which proves every job's resources fit the partition. The
watcher is then stopped with Ctrl-C (it exits at once with 130, saying the jobs were not touched and how to
stop them; they are still queued), the run is cancelled with `trinity cancel`, and none of its jobs remains
in the queue.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.execute.test_slurm_fit import cli, cluster, finish, live_jobs, project

__all__ = ["cluster", "project"]  # fixtures

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
README_COMMAND = ["run", "graphs/tiny.yaml", "--executor", "slurm"]


def states(run: Path) -> dict[str, str]:
    out = {}
    for status in (run / "nodes").glob("**/status.json"):
        out[str(status.parent.relative_to(run / "nodes"))] = json.loads(status.read_text())["state"]
    return out


def test_the_readme_slurm_command_runs_the_tiny_graph_on_the_local_cluster(cluster: None, project: Path) -> None:
    run = project / "runs" / "tiny"
    proc = cli(project, *README_COMMAND)
    try:
        deadline = time.monotonic() + 300
        seen: dict[str, str] = {}
        while True:
            seen = states(run) if run.is_dir() else {}
            prepared = [n for n in seen if n == "tokenizer" or n.startswith("prepare/")]
            done = len(prepared) == 5 and all(seen[n] == "SUCCEEDED" for n in prepared)
            if done and any(s == "RUNNING" for n, s in seen.items() if n.startswith("pretrain/")):
                break
            failed = {n: s for n, s in seen.items() if s in ("FAILED", "DEP_FAILED")}
            assert not failed and proc.poll() is None, (failed, proc.poll())
            assert time.monotonic() < deadline, f"tokenizer, prepare and a pretrain start took over 300 s: {seen}"
            time.sleep(1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the watching stops at once, the jobs stay Slurm's
        code, out = finish(proc, 60)
        assert code == 130, out
        said = " ".join(out.split())
        assert "stopped watching; the Slurm jobs were not touched:" in said and "`trinity cancel " in said, said
        queued = json.loads((run / "slurm_jobs.json").read_text())
        assert live_jobs(list(queued.values())), "Ctrl-C cancelled jobs"
        cancelled = cli(project, "cancel", "runs/tiny")
        out, _ = cancelled.communicate(timeout=120)
        assert cancelled.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    jobs: dict[str, str] = json.loads((run / "slurm_jobs.json").read_text())
    assert len(jobs) == 17  # one job per node of the tiny graph
    assert live_jobs(list(jobs.values())) == []
    final = states(run)
    assert all(s != "RUNNING" and s != "PENDING" for s in final.values()), final
    readme = (ROOT / "README.md").read_text()
    assert "trinity run " + " ".join(README_COMMAND[1:]) in readme, "the README shows this command"
