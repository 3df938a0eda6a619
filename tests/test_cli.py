"""The CLI end to end, as a user runs it: exit codes, messages without tracebacks, rendered graphs, diff, plan,
schema, the Slurm dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
            "execution.checkpoint.async=true",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    changes = {c["path"]: c for c in out["changes"]}
    assert changes["optim.adamw.lr"]["after"] == 0.001 and not changes["optim.adamw.lr"]["execution_only"]
    assert changes["execution.checkpoint.async"] == {
        "path": "execution.checkpoint.async", "before": None, "after": True, "execution_only": True,
        "identity": False,
    }  # fmt: skip
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
    sbatch = result.stdout[result.stdout.index("sbatch parameters") :]  # after the run/reuse table
    line = next(line for line in sbatch.splitlines() if "pretrain/phase1" in line)
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


# -- user text is printed as text; every bad input exits 2 with its location -----------------------

MARKUP = "[/bold]x [red]y[/red] :fire:"
"""Text that rich would style, drop or refuse (MarkupError) if it were read as markup, and an emoji code."""


def test_markup_in_values_is_printed_verbatim() -> None:
    closing = runner.invoke(app, ["validate", str(POST), "--set", "name=[/bold]x"])  # was a MarkupError, exit 1
    assert closing.exit_code == 2 and "name = '[/bold]x': must be" in closing.stderr
    typed = runner.invoke(app, ["validate", str(POST), "--set", f"model.d_model={MARKUP}"])
    assert typed.exit_code == 2
    assert f"--set #1 (model.d_model={MARKUP}): model.d_model = '{MARKUP}': Input should be" in typed.stderr
    changed = runner.invoke(app, ["diff", str(POST), str(POST), "--set", f"description={MARKUP}"])
    assert changed.exit_code == 0 and repr(MARKUP) in changed.stdout


def test_the_status_table_prints_user_text_verbatim() -> None:
    from rich.console import Console

    from trinity.cli_render import print_status

    console = Console(record=True, width=400)
    attempt = {"attempt": 1, "executor": "local", "state": "FAILED", "exit_code": 1, "resumed_from_step": None}
    report = {
        "run": {"name": MARKUP},
        "root": "/runs/[b]x",
        "nodes": [{"id": MARKUP, "state": "FAILED", "attempts": [attempt], "progress": {}, "message": MARKUP}],
    }
    print_status(console, report)
    text = console.export_text()
    assert text.count(MARKUP) == 3 and "/runs/[b]x" in text


def test_paths_and_node_ids_the_user_typed_are_printed_verbatim(tmp_path: Path) -> None:
    folder = tmp_path / "[red]x[" / "red] :fire:"  # the path holds '[red]x[/red] :fire:'
    folder.mkdir(parents=True)
    graph = folder / "g.yaml"
    graph.write_text(SMALL_GRAPH)
    ok = runner.invoke(app, ["validate", str(graph)])
    assert ok.exit_code == 0 and str(graph) in "".join(ok.stdout.splitlines()), ok.stdout
    explained = runner.invoke(app, ["explain", str(tmp_path), "[/bold]n"])  # was a MarkupError, exit 1
    assert explained.exit_code == 2, explained.stdout


def spec_file(tmp_path: Path, old: str, new: str) -> tuple[Path, int]:
    text, line = mutate(SMALL_GRAPH, old, new)
    (tmp_path / "g.yaml").write_text(text)
    return tmp_path / "g.yaml", line


def test_bad_numbers_exit_2_with_the_line(tmp_path: Path) -> None:
    """`.inf` crashed `validate` (exit 1, UnhashableValue); `true` was taken as 1."""
    path, line = spec_file(tmp_path, "mix: {code: 1.0, docs: 1.0}", "mix: {code: .inf, docs: 1.0}")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"g.yaml:{line}: data.phases.0.mix.code = inf: Input should be a finite number" in result.stderr
    path, line = spec_file(tmp_path, "d_model: 64", "d_model: true")
    result = runner.invoke(app, ["plan", str(path)])
    assert (
        result.exit_code == 2
        and f"g.yaml:{line}: model.d_model = True: Input should be a valid integer" in result.stderr
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"name: x\nbase: &b {seed: 1}\nother:\n  <<: *b\n", ":4: YAML merge keys (`<<`) are not supported"),
        (b"name: x\ndescription: caf\xe9\n", ":2: not UTF-8 text (invalid continuation byte at byte offset 24)"),
        (b"name: x\nmodel: " + b"[" * 5000 + b"]" * 5000 + b"\n", ":2: values nest more than 100 levels deep"),
        (b"name: x\ndescription: \x07\n", ":2: invalid YAML: character U+0007 is not allowed"),
    ],
    ids=["merge-key", "latin-1", "deep", "control-character"],
)
def test_bad_yaml_exits_2_with_the_line(tmp_path: Path, text: bytes, message: str) -> None:
    (tmp_path / "g.yaml").write_bytes(text)
    result = runner.invoke(app, ["validate", str(tmp_path / "g.yaml")])
    assert result.exit_code == 2, result.output
    assert f"g.yaml{message}" in result.stderr and "Traceback" not in result.output


def test_use_of_a_file_outside_the_project_exits_2_without_its_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finding: `use: ../../../../etc/shadow` printed a line of that file."""
    monkeypatch.delenv("TRINITY_SPEC_ROOT", raising=False)
    project = tmp_path / "project"
    (project / "graphs").mkdir(parents=True)
    (project / ".git").mkdir()
    (tmp_path / "shadow").write_text("root: *TOPSECRET42\n")  # PyYAML's message names the alias
    (project / "graphs" / "g.yaml").write_text("name: g\nmodel: {use: ../../shadow}\n")
    monkeypatch.chdir(project)
    result = runner.invoke(app, ["validate", "graphs/g.yaml"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: graphs/g.yaml:2: `use: ../../shadow` resolves outside the project")
    assert "TOPSECRET42" not in result.output


def test_control_characters_in_values_are_shown_escaped() -> None:
    """A value must not drive the terminal (an escape sequence) or break an error over lines."""
    result = runner.invoke(app, ["validate", str(POST), "--set", "model.d_model=\x1b[2Jx\ny"])
    assert result.exit_code == 2
    assert "\x1b" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: --set #1 (model.d_model=\\x1b[2Jx\\ny): model.d_model = ")
