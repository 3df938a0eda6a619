"""The run-directory contract (trinity/run/layout.py) as a real run of the micro graph's tokenizer leaves it:
run.json, spec.yaml, graph.json, and per node its outputs, attempt records, logs and heartbeat lease."""

from __future__ import annotations

from pathlib import Path

from tests.cli_runs import trinity
from trinity.run.layout import RunDir, read_json
from trinity.run.status import list_attempts


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
