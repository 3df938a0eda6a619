"""`trinity run --dry-run` says what a run would do, without running, submitting or writing anything: on the
local executor, each node's fate and why (no sbatch table); against an existing run directory, the reuse
decisions `trinity run` would take (issue 20 item 5)."""

from __future__ import annotations

from pathlib import Path

from tests.cli_runs import trinity


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))}


def _rows(out: str) -> dict[str, str]:
    """node -> its `would` cell, from the first table (one row per node)."""
    return {
        cells[1].strip(): cells[2].strip()
        for line in out.splitlines()
        if len(cells := line.split("│")) == 4 and cells[1].strip() not in ("", "node")
    }


def test_local_dry_run_of_a_new_run_directory_lists_every_node_and_no_sbatch_table(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    graph, _ = prepared
    result = trinity("run", str(graph), "--run-dir", str(tmp_path / "new"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "local executor" in result.stdout and "sbatch" not in result.stdout
    rows = _rows(result.stdout)
    for node in ("tokenizer", "prepare/phase1", "pretrain/phase1", "pretrain/phase2"):
        assert rows[node].startswith("runs:") and "does not exist yet" in rows[node], rows
    assert not (tmp_path / "new").exists()


def test_dry_run_against_a_run_shows_its_reuse_decisions_and_writes_nothing(prepared: tuple[Path, Path]) -> None:
    graph, run = prepared  # tokenizer and prepare/phase1 SUCCEEDED
    before = _tree(run)
    result = trinity("run", str(graph), "--run-dir", str(run), "--dry-run")
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert rows["tokenizer"].startswith("reused") and rows["prepare/phase1"].startswith("reused"), rows
    assert rows["pretrain/phase1"].startswith("runs:"), rows
    assert _tree(run) == before
