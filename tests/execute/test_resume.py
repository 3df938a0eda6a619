"""Exact resume: a pretraining node killed with SIGKILL at a random step continues bit for bit."""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

from tests.execute.conftest import NODE, losses, run_until_step, trinity
from trinity.run.layout import RunDir, read_json
from trinity.run.status import NodeStatus, list_attempts
from trinity.store.catalog import open_catalog


def test_sigkill_at_random_step_then_resume_is_bit_identical(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path
) -> None:
    graph, prepared_run = prepared
    killed = tmp_path / "killed"
    shutil.copytree(prepared_run, killed)
    expected = straight

    kill_at = random.Random(os.getpid()).randint(22, 50)  # past the first checkpoint (every 20 steps)
    proc = run_until_step(graph, killed, kill_at)
    node_dir = RunDir(killed).node(NODE)
    os.kill(read_json(node_dir.lease)["pid"], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == 1
    killed_step = NodeStatus.read(node_dir).progress["step"]
    assert NodeStatus.read(node_dir).state == "FAILED"

    resumed = trinity("resume", str(killed), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    attempts = list_attempts(node_dir)
    assert [a.state for a in attempts] == ["FAILED", "SUCCEEDED"]
    assert attempts[0].signal == signal.SIGKILL
    assert attempts[1].resumed_from_step is not None and 0 < attempts[1].resumed_from_step <= killed_step

    assert losses(killed) == expected  # every step once, bit for bit
    con = open_catalog(killed)
    dup = con.sql(f"select step, count(*) from steps where node = '{NODE}' group by step having count(*) > 1")
    assert dup.fetchall() == []
    history = con.sql(
        f"select attempt, count(*) from steps_history where node = '{NODE}' group by attempt order by attempt"
    ).fetchall()
    first_attempt_rows = history[0][1]
    assert first_attempt_rows >= attempts[1].resumed_from_step  # the killed attempt's rows stay as history
    recorded = con.sql(f"select attempt, state, signal from attempts where node = '{NODE}' order by attempt")
    assert recorded.fetchall()[0][1:] == ("FAILED", signal.SIGKILL)


def test_marker_less_newest_checkpoint_is_skipped(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """The newest checkpoint corrupted mid-write (no commit marker): resume uses the one before."""
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    result = trinity(
        "run", str(graph), "--run-dir", str(run), "--nodes", NODE, "--set", "execution.checkpoint_every=10"
    )
    assert result.returncode == 0
    expected = losses(run)
    node_dir = RunDir(run).node(NODE)
    newest = sorted(p for p in node_dir.checkpoints.iterdir() if p.name.startswith("step-"))[-1]
    (newest / "COMMITTED").unlink()  # as if killed between the rename and the marker
    status = NodeStatus.read(node_dir)
    status.state, status.message = "FAILED", "simulated crash"
    status.write(node_dir)
    shutil.rmtree(node_dir.outputs)

    assert "resume from its checkpoint at step 50" in trinity("explain", str(run), NODE).stdout
    resumed = trinity("resume", str(run), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert list_attempts(node_dir)[-1].resumed_from_step == 50
    assert losses(run) == expected


def test_non_finite_loss_fails_clearly_and_commits_nothing_bad(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    result = trinity(
        "run",
        str(graph),
        "--run-dir",
        str(run),
        "--nodes",
        NODE,
        "--set",
        "optim.adamw.lr=1.0e+30",
        "--set",
        "stability.grad_clip=null",
    )
    assert result.returncode == 1
    status = NodeStatus.read(RunDir(run).node(NODE))
    assert status.state == "FAILED"
    assert "Lower the learning rate" in status.message
    assert "nan" in status.message.lower() or "inf" in status.message.lower()
    assert not (RunDir(run).node(NODE).outputs / "final.json").exists()


def test_activation_capture_writes_committed_zarr(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    from trinity.store.checkpoint import load_checkpoint

    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    result = trinity(
        "run",
        str(graph),
        "--run-dir",
        str(run),
        "--nodes",
        NODE,
        "--set",
        "execution.activations=[layers.3]",
        "--set",
        "execution.activation_steps=[5, 40]",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    root = RunDir(run).node(NODE).activations
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-00000005", "step-00000040"]
    assert (root / "step-00000005" / "COMMITTED").is_file()
    captured = load_checkpoint(root / "step-00000005")
    hidden = captured["layers.3"]["hidden"]
    assert hidden.shape == (8, 64, 64)  # the step's 2 micro-batches of 4 sequences x 64 tokens x d_model
    assert captured["layers.3"]["router_scores"].shape == (8, 64, 8)


def test_ctrl_c_stops_at_a_checkpoint_and_resume_continues_exactly(
    prepared: tuple[Path, Path], straight: dict[int, float], tmp_path: Path
) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    proc = run_until_step(graph, run, 7)
    node_dir = RunDir(run).node(NODE)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the scheduler
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output
    assert "interrupted" in output
    status = NodeStatus.read(node_dir)
    assert status.state == "FAILED"
    assert "stopped on request; last committed checkpoint at step" in status.message
    stopped_at = int(status.message.rsplit(" ", 1)[-1])
    assert 7 <= stopped_at < 59  # a checkpoint was committed where it stopped, not at a cadence multiple
    resumed = trinity("resume", str(run), "--nodes", NODE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert list_attempts(node_dir)[-1].resumed_from_step == stopped_at
    assert losses(run) == straight


def test_the_guides_queries_run_as_written(straight_run: Path) -> None:
    """Every ```sql block of docs/guide.md answers on a real run (and returns rows)."""
    import re

    from tests.conftest import ROOT
    from trinity.store.sql import query

    guide = (ROOT / "docs" / "guide.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", guide, flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        names, rows = query(straight_run, block)
        assert names and rows, block


def test_sql_cli_answers_and_refuses_writes(straight_run: Path) -> None:
    ok = trinity(
        "sql",
        str(straight_run),
        "SELECT layer, max_vio FROM moe_layers WHERE step = 59 ORDER BY layer",
        "--format",
        "json",
    )
    assert ok.returncode == 0, ok.stderr
    import json

    rows = json.loads(ok.stdout)
    assert [r["layer"] for r in rows] == [0, 1, 2] and all(r["max_vio"] >= 0 for r in rows)
    for statement in ("DROP TABLE steps", "INSERT INTO steps SELECT * FROM steps", "COPY steps TO 'x.csv'"):
        refused = trinity("sql", str(straight_run), statement)
        assert refused.returncode == 2 and "read-only" in refused.stderr, statement


def test_plot_writes_pngs(straight_run: Path, tmp_path: Path) -> None:
    result = trinity("plot", str(straight_run), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
