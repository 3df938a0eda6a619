"""Evals during training (trinity.graph.during): the plain `trinity run` scores each intermediate checkpoint in
its own process while the training node still trains, the rows join the loss curve, a second run re-evaluates
nothing, and retention keeps a checkpoint until its eval succeeded."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tests.cli_runs import trinity
from tests.conftest import compose
from tests.execute.conftest import require_slurm_cluster
from trinity.execute.run import write_run
from trinity.nodes.checkpoints import referenced_steps, save_training_state
from trinity.nodes.context import NodeContext
from trinity.run.graph import RunGraph
from trinity.run.layout import RunDir
from trinity.run.status import NodeStatus, list_attempts
from trinity.spec.execution import CheckpointSpec
from trinity.spec.loading import load_experiment
from trinity.store.catalog import open_catalog
from trinity.store.checkpoint_commit import list_checkpoints

TRAIN = "pretrain/phase1"
FINAL = "eval/heldout@pretrain:phase1"
EVAL20, EVAL40 = f"{FINAL}@step20", f"{FINAL}@step40"
PHASE1 = {
    "name": "phase1",
    "tokens": 30000,
    "seq_len": 64,
    "mix": {"docs": 2.0, "math": 1.0},
    "loader": {"kind": "rsdb", "buffer_size": 16, "workers": 1},
}
"""tests/graphs/micro.yaml's first phase (59 steps), alone: its tokenizer and prepare node are the `prepared` ones."""

JOIN = """
select e.step, e.score as heldout_loss, s.loss as train_loss
from evals e join steps s on s.node = e.extra->>'stage_node' and s.step = e.step
where e.task = 'heldout_loss/all'
order by e.step
"""
"""The guide's query: the loss curve and the eval score of each checkpoint."""


def during_graph(path: Path) -> Path:
    """One phase, a checkpoint every 10 steps of which only the newest is kept, heldout loss every 20 steps."""
    return compose(
        path,
        "micro.yaml",
        data={"phases": [PHASE1]},
        execution={"checkpoint": {"every": 10, "keep_last": 1}},
        stages={
            "evals": [
                {"kind": "heldout_loss", "name": "heldout", "after": ["pretrain:phase1"], "seq_len": 64, "every": 20}
            ]
        },
    )


def test_retention_keeps_checkpoints_until_their_eval_succeeded(tmp_path: Path) -> None:
    write_run(load_experiment(during_graph(tmp_path / "g.yaml")), tmp_path / "run")
    graph = RunGraph.load(RunDir(tmp_path / "run"))
    node = graph[TRAIN]
    ctx = NodeContext(graph=graph, node=node, spec=graph.spec(node), base_dir=tmp_path, attempt=1, run_id="t")
    policy = CheckpointSpec(every=10, keep_last=1)
    kept: dict[int, list[int]] = {}
    for step in range(10, 60, 10):  # what the training loop does at each checkpoint, with tiny states
        if step == 40:  # the eval of step 20 succeeds while training goes on
            status = NodeStatus.read(graph.node_dir(EVAL20))
            status.state = "SUCCEEDED"
            status.write(graph.node_dir(EVAL20))
        save_training_state(
            ctx.dir, step, {"x": torch.full((2,), float(step))}, policy, protected=referenced_steps(ctx)
        )
        kept[step] = [c.step for c in list_checkpoints(ctx.dir.checkpoints) if c.committed]
    assert kept == {10: [10], 20: [20], 30: [20, 30], 40: [40], 50: [40, 50]}


@pytest.mark.slow
def test_plain_run_evaluates_checkpoints_while_training(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(prepared[1], run)  # the tokenizer and prepare/phase1 are done
    graph = during_graph(tmp_path / "g.yaml")
    result = trinity("run", str(graph), "--run-dir", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    nodes = RunDir(run)

    con = open_catalog(run)
    rows = con.sql("select node, step, extra->>'checkpoint' from evals where task = 'heldout_loss/all'").fetchall()
    assert sorted(rows) == sorted(
        [
            (EVAL20, 20, "checkpoints/step-00000020"),
            (EVAL40, 40, "checkpoints/step-00000040"),
            (FINAL, 59, "checkpoints/step-00000059"),
        ]
    )
    # Each checkpoint's eval ran in its own process, and the first ended while the training node still trained.
    trained = list_attempts(nodes.node(TRAIN))
    evaluated = list_attempts(nodes.node(EVAL20))
    assert len(trained) == 1 and len(evaluated) == 1 and evaluated[0].pid != trained[0].pid
    assert trained[0].end is not None and evaluated[0].end is not None
    assert datetime.fromisoformat(evaluated[0].end) < datetime.fromisoformat(trained[0].end)

    joined = con.sql(JOIN).fetchall()
    losses = dict(con.sql(f"select step, loss from steps where node = '{TRAIN}'").fetchall())
    scores = dict(con.sql("select step, score from evals where task = 'heldout_loss/all'").fetchall())
    assert joined == [(s, scores[s], losses[s]) for s in (20, 40, 59)]
    con.close()
    # Retention: with keep_last 1 step 20 lived until its eval read it; it is gone now that the eval succeeded.
    assert 20 not in [c.step for c in list_checkpoints(nodes.node(TRAIN).checkpoints)]
    assert json.loads((nodes.node(EVAL40).outputs / "results.json").read_text())["step"] == 40

    again = trinity("run", str(graph), "--run-dir", str(run))
    assert again.returncode == 0, again.stdout + again.stderr
    for node_id in (TRAIN, EVAL20, EVAL40, FINAL):  # nothing is evaluated twice
        assert len(list_attempts(nodes.node(node_id))) == 1, node_id
    # A training node that runs again (here: marked FAILED, as a crash would leave it) resumes with the same
    # identity, so the checkpoints already evaluated are not evaluated again; the final eval does run again.
    status = NodeStatus.read(nodes.node(TRAIN))
    status.state = "FAILED"
    status.write(nodes.node(TRAIN))
    explained = {n: trinity("explain", str(run), n).stdout for n in (EVAL20, FINAL)}
    assert "will be reused" in explained[EVAL20], explained
    assert f"upstream {TRAIN} will run" in explained[FINAL], explained


@pytest.mark.slow
@pytest.mark.slurm
def test_on_slurm_each_checkpoint_is_evaluated_by_its_own_job(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """The watcher submits an eval's job once its checkpoint is committed: one job per checkpoint, rows as locally."""
    require_slurm_cluster()
    run = tmp_path / "run"
    shutil.copytree(prepared[1], run)
    graph = during_graph(tmp_path / "g.yaml")
    slurm = ["--executor", "slurm", "--set", "execution.slurm.cpus_per_task=1"]
    result = trinity("run", str(graph), "--run-dir", str(run), *slurm)
    assert result.returncode == 0, result.stdout + result.stderr
    nodes = RunDir(run)
    jobs = {n: list_attempts(nodes.node(n)) for n in (TRAIN, EVAL20, EVAL40, FINAL)}
    assert all(len(a) == 1 and a[0].executor == "slurm" and a[0].job_id for a in jobs.values()), jobs
    assert len({a[0].job_id for a in jobs.values()}) == 4  # a job of its own for each checkpoint
    con = open_catalog(run)
    assert con.sql(JOIN).fetchall() == [
        (s, score, loss)
        for s, score, loss in con.sql(
            "select e.step, e.score, s.loss from evals e join steps s on s.step = e.step and s.node = ? "
            "where e.task = 'heldout_loss/all' order by 1",
            params=[TRAIN],
        ).fetchall()
    ]
    assert [r[0] for r in con.sql(JOIN).fetchall()] == [20, 40, 59]
