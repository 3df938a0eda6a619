"""A node's log as a user reads it, and how its attempts end: `trinity logs` shows what the node printed while
it runs (progress lines) and after (its end), `--follow` returns once the attempt ends, `trinity cancel` stops
a local run's node at a committed checkpoint, and an attempt killed while nobody watched ends KILLED with an
end time (not RUNNING forever), in `trinity status` and in SQL."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.cli_runs import NODE, run_until_step, trinity
from tests.conftest import compose
from tests.execute.test_liveness import gone_pid, lease, running  # noqa: F401 (a fixture)
from trinity.errors import RunError
from trinity.execute.attempt import RankPrefixed
from trinity.execute.commands import status_report
from trinity.execute.logs import attempt_log
from trinity.nodes.checkpoints import last_committed_step
from trinity.run.layout import NodeDir, RunDir, atomic_write_json
from trinity.run.status import list_attempts
from trinity.store.catalog import open_catalog


@pytest.mark.slow  # end to end: the micro node trains, is followed, cancelled and its log read back
def test_logs_show_a_running_node_and_cancel_stops_it_at_a_checkpoint(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    _, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    # 4x the micro model's layers: the node still trains after two CLI calls, however loaded the machine
    # (the micro node's 59 steps take 15 s; the prepare nodes keep their identities).
    slow = compose(tmp_path / "slow.yaml", "micro.yaml", model={"n_layers": 16})
    proc = run_until_step(slow, run, 3)
    try:
        shown = trinity("logs", str(run), NODE, "--attempt", "1")  # while it runs
        assert shown.returncode == 0, shown.stderr
        assert f"trinity: {NODE} attempt 1: pretrain node, identity " in shown.stdout
        assert f"trinity: {NODE}: step " in shown.stdout and "/59, loss " in shown.stdout, shown.stdout
        follower = subprocess.Popen(
            [sys.executable, "-m", "trinity.cli", "logs", str(run), NODE, "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        cancelled = trinity("cancel", str(run), NODE)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        followed, _ = follower.communicate(timeout=60)  # it returns by itself once the attempt ended
        assert proc.wait(timeout=120) == 1  # the run: 1 node did not succeed
    finally:
        if proc.poll() is None:
            proc.kill()
    node_dir = RunDir(run).node(NODE)
    step = last_committed_step(node_dir)
    assert step is not None and step < 59
    (attempt,) = list_attempts(node_dir)
    assert (attempt.state, attempt.exit_code, attempt.end is not None) == ("STOPPED", 3, True)
    assert attempt.message == f"cancelled with `trinity cancel`; last committed checkpoint at step {step}"
    assert f"{NODE}: attempt 1 STOPPED: {attempt.message}" in cancelled.stdout
    end_line = followed.rstrip().splitlines()[-1]  # the end line
    assert end_line.startswith(f"trinity: {NODE} attempt 1: STOPPED at 20") and end_line.endswith(attempt.message)
    assert followed.startswith(f"trinity: {NODE} attempt 1:"), followed
    assert followed == node_dir.log_file(1).read_text()  # --follow printed the whole file, once


def test_an_attempt_killed_while_nobody_watched_ends_killed_in_status_and_sql(
    running: tuple[RunDir, NodeDir],  # noqa: F811
) -> None:
    run, node_dir = running  # its record is new and it has no lease yet: it is starting, left RUNNING
    [starting] = [n for n in status_report(run.root)["nodes"] if n["id"] == "tokenizer"]
    assert [a["state"] for a in starting["attempts"]] == ["RUNNING"]
    heartbeat = time.time() - 1
    atomic_write_json(node_dir.lease, lease(pid=gone_pid(), time=heartbeat))  # attempt 1's process is gone
    shown = trinity("status", str(run.root), "--json")
    assert shown.returncode == 0, shown.stderr
    [node] = [n for n in json.loads(shown.stdout)["nodes"] if n["id"] == "tokenizer"]
    [attempt] = node["attempts"]
    assert attempt["state"] == "KILLED" and attempt["signal"] is None
    assert abs(datetime.fromisoformat(attempt["end"]).timestamp() - heartbeat) < 0.01  # its last heartbeat
    assert "its process ended without recording how" in attempt["message"] and "SIGKILL" in attempt["message"]
    killed = open_catalog(run.root).sql("select node, attempt, state, signal from attempts").fetchall()
    assert killed == [("tokenizer", 1, "KILLED", None)]  # "which attempt was killed" answered in SQL


def test_logs_of_a_node_that_has_not_run_say_so(running: tuple[RunDir, NodeDir]) -> None:  # noqa: F811
    run, _ = running
    shown = trinity("logs", str(run.root), "prepare/phase1")
    assert shown.returncode == 2 and "prepare/phase1 has no attempt yet" in shown.stderr, shown.stderr
    with pytest.raises(RunError, match=r"tokenizer has no attempt 4 \(attempts: 1\)"):
        attempt_log(run.root, "tokenizer", 4)


def test_each_ranks_lines_carry_its_prefix_whole() -> None:
    log = io.StringIO()
    rank0, rank1 = RankPrefixed(log, "[rank 0] "), RankPrefixed(log, "[rank 1] ")
    rank0.write("step 1")
    rank1.write("Traceback:\n  line\n")
    rank0.write(", loss 2.5\nend")
    rank0.flush()
    assert log.getvalue() == "[rank 1] Traceback:\n[rank 1]   line\n[rank 0] step 1, loss 2.5\n[rank 0] end"
