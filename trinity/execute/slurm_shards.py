"""A prepare node's shards on Slurm: one job array, then the node's own job.

A phase's prepare (trinity.nodes.prepare) deals the pieces it needs to `execution.prepare.shards`
shards. On Slurm each shard is one task of a job array (at most `execution.slurm.array_parallelism` at
once) that tokenizes and commits its shard's pieces (`ShardJob`, in-process: a task holds no node
state, only committed pieces). The node's own job waits for the whole array with `afterany`, not
`afterok`: it runs even if a task failed, finds the committed pieces, tokenizes whatever is missing
(saying why, e.g. an unreadable file, if it fails again), and commits the phase's store. A preempted
or timed-out task is requeued by submitit and resumes at its first piece not committed.

The array's job id is kept in RUN/slurm_shard_arrays.json (node -> array job id), so `trinity cancel`
cancels the shards with their node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import submitit

from trinity.run.graph import RunGraph
from trinity.run.layout import RunDir, atomic_write_json, read_json
from trinity.spec.experiment import ExperimentSpec

ARRAYS_FILE = "slurm_shard_arrays.json"


def shard_count(kind: str, spec: ExperimentSpec) -> int:
    """Shard tasks a node is submitted with before its own job (0: none, the node's job does it all)."""
    shards = spec.execution.prepare.shards
    return shards if kind == "prepare" and shards > 1 else 0


class ShardJob(submitit.helpers.Checkpointable):
    """Tokenize and commit one shard's pieces of a prepare node (picklable: paths and numbers only).

    Requeued as is on preemption or timeout (`Checkpointable`): committed pieces are kept."""

    def __init__(self, run_root: str, node_id: str, shard: int) -> None:
        self.run_root, self.node_id, self.shard = run_root, node_id, shard

    def __call__(self) -> str:
        from trinity.nodes.context import NodeContext
        from trinity.nodes.data_nodes import run_prepare_shard

        run = RunDir(Path(self.run_root))
        graph = RunGraph.load(run)
        node = graph[self.node_id]
        meta = read_json(run.run_json)
        ctx = NodeContext(
            graph=graph,
            node=node,
            spec=graph.spec(node),
            base_dir=Path(meta["base_dir"]),
            attempt=0,
            run_id=meta["run_id"],
            executor="slurm",
        )
        metrics = run_prepare_shard(ctx, self.shard)
        print(json.dumps({"shard": self.shard, **metrics}, default=str), flush=True)
        return f"shard {self.shard} done"


def submit_shards(
    run: RunDir, node_id: str, spec: ExperimentSpec, params: dict[str, Any], folder: Path, max_requeues: int
) -> str:
    """Submit the node's shards as one job array with the node's resources and dependencies; returns its job id."""
    count = shard_count("prepare", spec)
    p = dict(params)
    p["job_name"] = f"{params['job_name']}:shards"[:120]
    p["array_parallelism"] = spec.execution.slurm.array_parallelism
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    ex.update_parameters(**p)
    with ex.batch():
        jobs = [ex.submit(ShardJob(str(run.root), node_id, i)) for i in range(count)]
    array_id = str(jobs[0].job_id).split("_")[0]
    path = run.root / ARRAYS_FILE
    arrays = read_json(path) if path.is_file() else {}
    arrays[node_id] = array_id
    atomic_write_json(path, arrays)
    return array_id


def shard_arrays(run: RunDir) -> dict[str, str]:
    """node -> job id of its latest shard array (empty when none was submitted)."""
    path = run.root / ARRAYS_FILE
    return {str(k): str(v) for k, v in read_json(path).items()} if path.is_file() else {}
