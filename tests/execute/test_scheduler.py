"""The local executor and scheduler against real node processes: states, attempts, failure, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.execute.conftest import trinity
from trinity.run.layout import RunDir, read_json
from trinity.run.status import NodeStatus, list_attempts


def states(run: Path) -> dict[str, str]:
    report = json.loads(trinity("status", str(run), "--json").stdout)
    return {n["id"]: n["state"] for n in report["nodes"]}


def test_failure_marks_downstream_dep_failed_and_resume_reruns_exactly_those(micro_graph: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # prepare/phase3 reads extra.jsonl, which does not exist yet: it fails.
    text = micro_graph.read_text().replace(
        "  phases:\n",
        "  phases:\n    - {name: phase0, tokens: 2000, seq_len: 64, mix: {extra: 1.0}}\n",
    )
    micro_graph.write_text(text)
    first = trinity(
        "run", str(micro_graph), "--run-dir", str(run), "--nodes", "prepare/*", "--nodes", "pretrain/phase0"
    )
    assert first.returncode == 1, first.stdout + first.stderr
    s = states(run)
    assert s["tokenizer"] == "SUCCEEDED"
    assert s["prepare/phase1"] == "SUCCEEDED"
    assert s["prepare/phase0"] == "FAILED"
    status = NodeStatus.read(RunDir(run).node("prepare/phase0"))
    assert "extra.jsonl" in status.message
    attempts = list_attempts(RunDir(run).node("prepare/phase0"))
    assert [a.state for a in attempts] == ["FAILED"] and attempts[0].exit_code == 1
    assert s["pretrain/phase0"] == "DEP_FAILED"

    explained = trinity("explain", str(run), "prepare/phase0").stdout
    assert "will run: FAILED in attempt 1" in explained
    assert "will be reused" in trinity("explain", str(run), "prepare/phase1").stdout

    (tmp_path / "extra.jsonl").write_text(
        "".join(json.dumps({"text": f"extra document {i} " * 20}) + "\n" for i in range(50))
    )
    second = trinity("resume", str(run), "--nodes", "prepare/*")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 node(s) to run, 3 reused" in second.stdout  # the tokenizer and 2 other prepares are reused
    assert [a.state for a in list_attempts(RunDir(run).node("prepare/phase0"))] == ["FAILED", "SUCCEEDED"]
    assert len(list_attempts(RunDir(run).node("prepare/phase1"))) == 1


def test_run_directory_contract(micro_graph: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = trinity("run", str(micro_graph), "--run-dir", str(run), "--nodes", "tokenizer")
    assert result.returncode == 0, result.stdout + result.stderr
    graph = read_json(run / "graph.json")
    ids = [n["id"] for n in graph["nodes"]]
    assert ids[0] == "tokenizer" and "pretrain/phase2" in ids
    node = graph["nodes"][0]
    assert node["flat_spec"]["model.moe.n_experts"] == 8
    assert (run / "spec.yaml").is_file() and (run / "run.json").is_file()
    tok = RunDir(run).node("tokenizer")
    assert (tok.outputs / "tokenizer.json").is_file()
    record = list_attempts(tok)[0]
    assert record.state == "SUCCEEDED" and record.exit_code == 0 and record.pid and record.end
    assert tok.log_file(1).is_file()
    lease = read_json(tok.lease)
    assert lease["attempt"] == 1


def test_a_second_scheduler_on_the_same_run_is_refused(micro_graph: Path, tmp_path: Path) -> None:
    from trinity.errors import RunError
    from trinity.execute.run import RunLock

    run = RunDir(tmp_path / "run")
    with RunLock(run):
        try:
            with RunLock(run):
                raise AssertionError("a second lock was granted")
        except RunError as exc:
            assert "already being run by" in str(exc)


def test_stale_lease_means_died(tmp_path: Path) -> None:
    import os
    import time

    from trinity.run.layout import NodeDir, atomic_write_json
    from trinity.run.status import lease_is_stale

    node = NodeDir(tmp_path / "n")
    assert lease_is_stale(node)  # no lease at all
    atomic_write_json(
        node.lease, {"pid": os.getpid(), "host": os.uname().nodename, "time": time.time(), "period_s": 30}
    )
    assert not lease_is_stale(node)
    atomic_write_json(
        node.lease, {"pid": os.getpid(), "host": os.uname().nodename, "time": time.time() - 100, "period_s": 30}
    )
    assert lease_is_stale(node)  # no heartbeat for 3 periods
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    atomic_write_json(node.lease, {"pid": dead.pid, "host": os.uname().nodename, "time": time.time(), "period_s": 30})
    assert lease_is_stale(node)  # fresh heartbeat, but the process is gone
