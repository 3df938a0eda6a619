"""A sweep that cannot give the branches it lists is a located spec error from `trinity validate` and `trinity
plan`: an empty value list, and a key no node's identity depends on (an `execution.*` or `parallel.*` field,
the description), which would silently collapse to one branch."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import compose
from trinity.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("grid", "says"),
    [
        ({"optim.muon.lr": []}, "at least 1 item"),
        ({"execution.local.threads": [1, 2]}, "would collapse"),
        ({"parallel.micro_batch": [1, 2]}, "would collapse"),
        ({"optim.muon.lr": [0.01, 0.02], "description": ["a", "b"]}, "would collapse"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_a_sweep_without_its_branches_is_a_located_error(
    tmp_path: Path, grid: dict[str, list[object]], says: str, command: str
) -> None:
    graph = compose(tmp_path / "sweep.yaml", "micro.yaml", sweep={"grid": grid})
    result = runner.invoke(app, [command, str(graph)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    key = list(grid)[-1]
    line = 1 + graph.read_text().splitlines().index(f"    {key}:" if grid[key] else f"    {key}: []")
    assert f"sweep.yaml:{line}: sweep.grid.{key}" in " ".join(result.output.split()), result.output
    assert says in " ".join(result.output.split())


def test_a_sweep_over_a_result_field_keeps_its_branches(tmp_path: Path) -> None:
    plain = runner.invoke(app, ["validate", str(compose(tmp_path / "plain.yaml", "micro.yaml"))])
    graph = compose(tmp_path / "sweep.yaml", "micro.yaml", sweep={"grid": {"optim.muon.lr": [0.01, 0.02]}})
    result = runner.invoke(app, ["validate", str(graph)])
    assert plain.exit_code == 0 and result.exit_code == 0, result.output
    assert "(micro: 5 nodes)" in plain.output
    assert "(micro: 7 nodes)" in result.output  # the 2 pretraining nodes per branch; data nodes shared
