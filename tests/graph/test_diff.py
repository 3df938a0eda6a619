"""`trinity diff` marks a changed field as an identity field exactly when it can re-run nodes: the name, the
description and the layout (`parallel.*`) re-run nothing and are marked so; a result field is marked and
re-runs the nodes the compiler gives a new identity."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tests.conftest import compose
from trinity.cli import app

runner = CliRunner()


def test_diff_marks_identity_fields_as_the_reruns_show(tmp_path: Path) -> None:
    a = compose(tmp_path / "a.yaml", "micro.yaml")
    b = compose(tmp_path / "b.yaml", "micro.yaml", name="renamed", description="other words", parallel={"nodes": 1})
    cosmetic = runner.invoke(app, ["diff", str(a), str(b), "--set", "parallel.micro_batch=1", "--json"])
    assert cosmetic.exit_code == 0, cosmetic.output
    result = json.loads(cosmetic.output)
    assert {"name", "description", "parallel.micro_batch"} <= {c["path"] for c in result["changes"]}
    assert result["rerun"] == [] and all(not c["identity"] for c in result["changes"])
    table = runner.invoke(app, ["diff", str(a), str(b), "--set", "parallel.micro_batch=1"], terminal_width=200)
    assert "re-run (0)" in table.output and " yes " not in table.output, table.output

    real = runner.invoke(app, ["diff", str(a), str(a), "--set", "optim.muon.lr=0.005", "--json"])
    result = json.loads(real.output)
    assert [c["path"] for c in result["changes"] if c["identity"]] == ["optim.muon.lr"]
    assert result["rerun"] and all(n.startswith("pretrain/") for n in result["rerun"])
