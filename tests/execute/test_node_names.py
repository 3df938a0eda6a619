"""Node ids with a sweep label in brackets (`tokenizer[tokenizer.sample_bytes=200000]`), as a user types and
reads them: `--nodes ID` selects exactly that id, globs keep working, and the run's messages print the id
with its brackets (rich would read `[...]` as markup and drop it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_runs import trinity
from tests.conftest import compose
from trinity.execute.commands import matches

IDS = ["tokenizer", "pretrain/phase1", "pretrain/phase1[muon.lr=0.02]", "pretrain/phase2[muon.lr=0.01]"]
IDS += ["pretrain/phase2[muon.lr=0.02]"]


@pytest.mark.parametrize(
    ("pattern", "selected"),
    [
        ("pretrain/phase2[muon.lr=0.02]", {"pretrain/phase2[muon.lr=0.02]"}),  # an id as printed: itself only
        ("pretrain/*[muon.lr=0.02]", {"pretrain/phase1[muon.lr=0.02]", "pretrain/phase2[muon.lr=0.02]"}),
        ("pretrain/phase2[muon.lr=0.0?]", {"pretrain/phase2[muon.lr=0.01]", "pretrain/phase2[muon.lr=0.02]"}),
        ("pretrain/phase[12]", {"pretrain/phase1"}),  # a character class still is one
        ("tok*", {"tokenizer"}),
        ("pretrain/phase3*", set()),
    ],
)
def test_a_pattern_selects_the_id_it_names_and_what_it_globs(pattern: str, selected: set[str]) -> None:
    assert matches(IDS, pattern) == selected


@pytest.mark.slow
def test_run_selects_a_bracketed_id_exactly_and_prints_it_whole(tmp_path: Path) -> None:
    """Two tokenizer branches reading a missing file: `--nodes` with one branch's id runs that branch only,
    and its failure names it with the brackets (before: the id matched no node; a glob printed `tokenizer`)."""
    graph = compose(
        tmp_path / "g.yaml",
        "micro.yaml",
        data={"sources": {"extra": {"kind": "jsonl", "paths": ["missing.jsonl"]}}},
        tokenizer={"sources": ["extra"]},
        sweep={"grid": {"tokenizer.sample_bytes": [100000, 200000]}},
    )
    node, other = "tokenizer[tokenizer.sample_bytes=200000]", "tokenizer[tokenizer.sample_bytes=100000]"
    run = tmp_path / "run"
    result = trinity("run", str(graph), "--run-dir", str(run), "--nodes", node)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 node(s) to run, 0 reused" in result.stdout
    assert f"1 node(s) did not succeed: {node}. See `trinity status {run.resolve()}`" in result.stdout
    assert f"│ {node} │ FAILED │" in result.stdout  # the node table, as printed off a terminal
    assert (run / "nodes" / node / "attempts").is_dir()
    assert not (run / "nodes" / other / "attempts").exists()
