"""The scheduler against real node processes: a failure marks what follows DEP_FAILED, and resume re-runs
exactly the failed node and what follows."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.cli_runs import trinity
from tests.conftest import ROOT, compose
from trinity.run.layout import RunDir
from trinity.run.status import NodeStatus, list_attempts


def states(run: Path) -> dict[str, str]:
    report = json.loads(trinity("status", str(run), "--json").stdout)
    return {n["id"]: n["state"] for n in report["nodes"]}


def test_failure_marks_downstream_dep_failed_and_resume_reruns_exactly_those(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A first phase reading extra.jsonl, which does not exist yet: its prepare node fails.
    micro_data = yaml.safe_load((ROOT / "specs" / "data" / "micro.yaml").read_text())
    extra = {"name": "phase0", "tokens": 2000, "seq_len": 64, "mix": {"extra": 1.0}}
    data = {"sources": {"extra": {"kind": "jsonl", "paths": ["extra.jsonl"]}}, "phases": [extra, *micro_data["phases"]]}
    graph = compose(tmp_path / "micro.yaml", "micro.yaml", data=data)
    first = trinity("run", str(graph), "--run-dir", str(run), "--nodes", "prepare/*", "--nodes", "pretrain/phase0")
    assert first.returncode == 1, first.stdout + first.stderr
    s = states(run)
    assert s["tokenizer"] == "SUCCEEDED"
    assert s["prepare/phase0"] == "FAILED"
    # The later phases' prepares continue phase0's streams: they wait on it, as its pretraining does.
    assert s["prepare/phase1"] == s["prepare/phase2"] == "DEP_FAILED"
    status = NodeStatus.read(RunDir(run).node("prepare/phase0"))
    assert "extra.jsonl" in status.message
    attempts = list_attempts(RunDir(run).node("prepare/phase0"))
    assert [a.state for a in attempts] == ["FAILED"] and attempts[0].exit_code == 1
    assert s["pretrain/phase0"] == "DEP_FAILED"

    explained = trinity("explain", str(run), "prepare/phase0").stdout
    assert "will run: FAILED in attempt 1" in explained
    assert "will be reused" in trinity("explain", str(run), "tokenizer").stdout
    assert "will run: upstream prepare/phase0 will run" in trinity("explain", str(run), "prepare/phase1").stdout

    (tmp_path / "extra.jsonl").write_text(
        "".join(json.dumps({"text": f"extra document {i} " * 20}) + "\n" for i in range(50))
    )
    second = trinity("resume", str(run), "--nodes", "prepare/*")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "3 node(s) to run, 1 reused" in second.stdout  # the tokenizer is reused; the three prepares run
    assert [a.state for a in list_attempts(RunDir(run).node("prepare/phase0"))] == ["FAILED", "SUCCEEDED"]
    assert [a.state for a in list_attempts(RunDir(run).node("prepare/phase1"))] == ["SUCCEEDED"]  # its only run
    assert len(list_attempts(RunDir(run).node("tokenizer"))) == 1
