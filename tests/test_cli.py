"""The CLI end to end, as a user runs it: exit codes, messages without tracebacks, rendered graphs, diff, plan,
schema, the Slurm dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from tests.conftest import ROOT, SMALL_GRAPH, TEST_GRAPHS, mutate
from trinity.cli import app
from trinity.execute.run import write_run
from trinity.spec.loading import load_experiment

runner = CliRunner()
POST = TEST_GRAPHS / "micro-post.yaml"
EVALS = [("heldout", "pretrain"), ("heldout", "extend"), ("mk_niah", "pretrain"), ("mk_niah", "extend")]
EVALS += [("arithmetic", "sft"), ("arithmetic", "rl")]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trinity.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_bad_spec_exits_2_without_traceback(tmp_path: Path) -> None:
    text, line = mutate(SMALL_GRAPH, "top_k: 2", "top_k: 9")
    (tmp_path / "bad.yaml").write_text(text)
    proc = run_cli("plan", str(tmp_path / "bad.yaml"))
    assert proc.returncode == 2
    assert f"bad.yaml:{line}: model.moe.top_k = 9 must be <= n_experts (8)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    debug = run_cli("plan", str(tmp_path / "bad.yaml"), "--debug")
    assert "Traceback" in debug.stderr


def test_missing_file_exits_2_with_its_name() -> None:
    proc = run_cli("validate", "graphs/nope.yaml")
    assert proc.returncode == 2
    assert "graphs/nope.yaml: cannot read" in proc.stderr


def test_plan_human_output_lists_nodes_and_estimates() -> None:
    result = runner.invoke(app, ["plan", str(ROOT / "graphs" / "trinity-nano.yaml")])
    assert result.exit_code == 0, result.output
    for text in ("pretrain/phase1", "prepare/phase3", "eval/mk_niah@extend", "6.12B", "1.02B", "GPU-hours"):
        assert text in result.stdout


def test_graph_formats() -> None:
    mermaid = runner.invoke(app, ["graph", str(POST), "--format", "mermaid"])
    assert mermaid.exit_code == 0
    assert mermaid.stdout.startswith("flowchart LR")
    assert "prepare_phase1 --> pretrain_phase1" in mermaid.stdout
    dot = runner.invoke(app, ["graph", str(POST), "--format", "dot"])
    assert '"pretrain/phase2" -> "extend";' in dot.stdout
    bad = runner.invoke(app, ["graph", str(POST), "--format", "png"])
    assert bad.exit_code == 2 and "allowed: mermaid, dot" in bad.stderr


def test_diff_reports_fields_and_invalidated_nodes() -> None:
    result = runner.invoke(
        app,
        [
            "diff",
            str(POST),
            str(POST),
            "--set",
            "optim.adamw.lr=0.001",
            "--set",
            "execution.checkpoint_every=5",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    changes = {c["path"]: c for c in out["changes"]}
    assert changes["optim.adamw.lr"]["after"] == 0.001 and not changes["optim.adamw.lr"]["execution_only"]
    assert changes["execution.checkpoint_every"]["execution_only"]
    trained = {"pretrain/phase1", "pretrain/phase2", "extend", "sft", "rl"}
    evals = {f"eval/{task}@{stage}" for task, stage in EVALS}
    assert set(out["rerun"]) == trained | evals  # everything that trains, and what evaluates it
    assert set(out["reused"]) == {"tokenizer", "prepare/phase1", "prepare/phase2", "prepare/extend"}


def test_schema_command_prints_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert json.loads(result.stdout)["title"] == "trinity experiment graph"


def test_slurm_dry_run_prints_the_published_large_layout() -> None:
    """256 nodes x 8 GPUs for each pretraining phase of Large; nothing submitted (no cluster needed)."""
    result = run_cli("run", "graphs/trinity-large.yaml", "--executor", "slurm", "--dry-run")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "pretrain/phase1" in line)
    cells = [c.strip() for c in line.split("│") if c.strip()]
    assert cells[:5] == ["pretrain/phase1", "256", "8", "8", "8"]  # nodes, tasks/node, GPUs/node, CPUs/task
    assert not (ROOT / "runs" / "trinity-large").exists()


def test_generate_refuses_a_non_training_node(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", str(POST), "--run-dir", str(run), "--nodes", "nothing*"]).exit_code == 2
    write_run(load_experiment(POST), run)
    result = run_cli("generate", str(run), "hello", "--node", "tokenizer")
    assert result.returncode == 2
    assert "generate from a training node" in result.stderr
