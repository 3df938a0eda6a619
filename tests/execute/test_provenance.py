"""Provenance of attempts (trinity.execute.provenance): what real attempts record, its typed columns in SQL, and
the warning of `trinity status` / `trinity explain` when a node's attempts ran other code.

Expectations come from elsewhere than the code under test: git itself (rev-parse HEAD), torch's own version,
the platform module, the host name; the code change is a real one (an edited file of a git checkout the
attempts ran from, through PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trinity
from tests.cli_runs import NODE
from tests.cli_runs import trinity as trinity_cli
from tests.conftest import ROOT, compose
from trinity.run.layout import RunDir
from trinity.run.status import AttemptRecord
from trinity.store.catalog import open_catalog


def _git_head(path: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_a_real_attempt_records_its_provenance_with_typed_columns(prepared: tuple[Path, Path]) -> None:
    _, run = prepared
    record = AttemptRecord.read(RunDir(run).node("tokenizer"), 1)
    prov = record.provenance
    assert prov is not None
    assert prov["trinity_version"] == trinity.__version__
    assert prov["git_commit"] == _git_head(Path(trinity.__file__).parent)  # None outside a checkout
    assert prov["python"] == platform.python_version()
    assert prov["torch"] == torch.__version__ and prov["cuda"] == torch.version.cuda
    assert prov["hosts"] == [socket.gethostname()]
    assert len(prov["packages_sha256"]) == 64 and int(prov["packages_sha256"], 16) >= 0
    con = open_catalog(run)
    row = con.sql(
        "select typeof(git_commit), typeof(hosts), typeof(packages_sha256), git_commit, hosts, torch, python "
        "from attempts where node = 'tokenizer' and attempt = 1"
    ).fetchall()[0]
    assert row[:3] == ("VARCHAR", "VARCHAR[]", "VARCHAR")
    assert row[3:] == (prov["git_commit"], prov["hosts"], torch.__version__, platform.python_version())


@pytest.mark.slow
def test_every_rank_of_a_two_rank_node_is_a_host(two_rank_run: Path) -> None:
    record = AttemptRecord.read(RunDir(two_rank_run).node(NODE), 1)
    assert record.provenance is not None
    assert record.provenance["hosts"] == [socket.gethostname()] * 2  # gathered from both ranks


def _checkout_of_the_package(root: Path) -> Path:
    """A git repository holding a copy of the trinity package this test imports, committed; returns its root."""
    shutil.copytree(Path(trinity.__file__).parent, root / "trinity", ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".gitignore").write_text("__pycache__/\n")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], check=True)
    return root


@pytest.mark.slow
def test_status_warns_when_a_later_attempt_ran_other_code(tmp_path: Path) -> None:
    checkout = _checkout_of_the_package(tmp_path / "checkout")
    env = {**os.environ, "PYTHONPATH": str(checkout), "TRINITY_SPEC_ROOT": str(ROOT)}
    graph = compose(tmp_path / "micro.yaml", "micro.yaml")
    run = tmp_path / "run"

    def attempt(n: int) -> None:
        if n == 1:
            command = ["-m", "trinity.cli", "run", str(graph), "--run-dir", str(run), "--nodes", "tokenizer"]
        else:  # what an executor launches for a further attempt of the node
            command = ["-m", "trinity.execute.attempt", str(run), "tokenizer", "--attempt", str(n)]
        done = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def report() -> dict[str, object]:
        done = trinity_cli("status", str(run), "--json")
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    attempt(1)
    attempt(2)
    node = RunDir(run).node("tokenizer")
    first = AttemptRecord.read(node, 1).provenance
    assert first is not None and first["git_commit"] == _git_head(checkout) and first["git_dirty"] is None
    assert report()["code_changed"] == []  # the same code twice: no warning

    init = checkout / "trinity" / "__init__.py"
    init.write_text(init.read_text() + "\n# edited between attempts\n")
    attempt(3)
    third = AttemptRecord.read(node, 3).provenance
    assert third is not None and third["git_commit"] == first["git_commit"] and third["git_dirty"] is not None
    (change,) = report()["code_changed"]  # type: ignore[misc]
    assert change["node"] == "tokenizer" and change["attempt"] == 3
    assert [(d["attempt"], sorted(d["keys"])) for d in change["differs_from"]] == [
        (1, ["git_dirty"]),
        (2, ["git_dirty"]),
    ]

    shown = trinity_cli("status", str(run))
    assert "code changed: tokenizer: attempt 3 ran other code than attempt 1 (git_dirty); attempt 2 (git_dirty)" in (
        " ".join(shown.stdout.split())
    )
    explained = trinity_cli("explain", str(run), "tokenizer")
    assert explained.returncode == 0, explained.stderr
    assert f"attempt 3 ran: trinity {trinity.__version__}, git {first['git_commit'][:12]} with uncommitted" in (
        explained.stdout
    )
    assert f"attempt 1 ran other code: git_dirty none -> {third['git_dirty'][:12]}" in explained.stdout
