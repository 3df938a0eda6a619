"""The Slurm executor: the whole DAG queued at once through submitit, watched until it settles.

- Each node is a job (`NodeJob`) with resources from the spec's `execution.slurm` and `parallel`
  parts. A training node of several ranks is one job of `parallel.nodes` nodes with
  `parallel.gpus_per_node` tasks each, one rank per task (rendezvous from Slurm's environment).
- A DAG edge is an `afterok` dependency; with `DependencyParameters=kill_invalid_depend` Slurm
  cancels the dependants of a failed job, and they are marked DEP_FAILED.
- Sibling nodes of a sweep (same node, different branches) are one job array, in chunks under
  MaxArraySize, with `execution.slurm.array_parallelism`. An array whose siblings each depend on
  the matching task of an upstream array uses `aftercorr`.
- Resources fit the partition (`slurm_cluster`): defaults are capped by what `sinfo` says it offers,
  explicit values beyond it are refused before anything is submitted.
- Watching costs one `squeue` call per poll for all jobs of the run (`sacct` for jobs the controller
  no longer holds), each with a timeout (`slurm_queue`); a call that fails is retried at the next poll,
  and a watcher that hears nothing for UNANSWERED_LIMIT_S gives up with the jobs left queued. A job
  pending for a reason that never clears (PartitionConfig, BadConstraints, ...) fails its node with
  that reason and is cancelled; Slurm then cancels its dependants, which become DEP_FAILED.
- A prepare node with `execution.prepare.shards` > 1 is a job array of its shards followed by its own
  job (`afterany` on the array), see `slurm_shards`.
- The job's sbatch script (submitit's `<job>_submission.sh`) and its Slurm logs stay in the node
  folder under `slurm/`.
- An eval of an intermediate checkpoint (trinity.graph.during) reads a checkpoint of a training job that is
  still running, which no Slurm dependency can express (afterok waits for the job's end). The watcher
  submits it once the checkpoint is committed (`trinity.execute.during.ready`), with `afterok` on its other
  dependencies that are still queued; it is DEP_FAILED if its training job ends without that checkpoint.
  Without `--wait` nobody watches: it is queued at once with `afterok` on the training job, so it scores the
  checkpoint after training ends (retention keeps the checkpoint until its eval succeeded).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import submitit

from trinity.errors import RunError, SpecError
from trinity.execute import during
from trinity.execute.run import Decision, mark_pending, supersede
from trinity.execute.slurm_cluster import Cluster, Partition, fit_resources
from trinity.execute.slurm_job import NodeJob
from trinity.execute.slurm_queue import JobState, explain_reason, never_starts, query_jobs, scancel_jobs
from trinity.execute.slurm_shards import shard_arrays, shard_count, submit_shards
from trinity.graph.compile import Node, nodes_in_order
from trinity.run.layout import RunDir, read_json
from trinity.run.status import AttemptRecord, NodeStatus, list_attempts
from trinity.spec.experiment import ExperimentSpec

POLL_S = 2.0
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
}
NEVER_GRACE_S = 20.0
"""A pending reason that never clears must hold this long (two polls at least) before the node is failed:
a node briefly down or being reconfigured is not a reason to give up."""
UNANSWERED_LIMIT_S = 600.0
"""The watcher gives up when Slurm has not answered for this long (the jobs stay queued; `trinity status`
follows them)."""


def base_id(node_id: str) -> str:
    """A node id without its sweep-branch label: pretrain/phase1[muon.lr=0.01] -> pretrain/phase1."""
    return node_id.split("[", 1)[0]


def sbatch_parameters(node: Node, spec: ExperimentSpec, partition: Partition | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of a node: resources by kind from the spec, fitted to `partition`
    (the one the node goes to, from `Cluster`; None: unknown, nothing capped or checked)."""
    slurm = spec.execution.slurm
    fitted = fit_resources(node.kind, spec, partition)
    params: dict[str, Any] = {
        "job_name": f"trinity:{spec.name}:{node.id}"[:120],
        "signal_delay_s": slurm.signal_delay_s,
        "array_parallelism": slurm.array_parallelism,
        "stderr_to_stdout": True,
        **fitted,
    }
    if fitted["ntasks_per_node"] * fitted["nodes"] > 1:
        # One task per rank; every task runs NodeJob, which starts that rank's node process. A task that
        # fails ends the step (--kill-on-bad-exit), so no rank waits for a peer that is gone.
        params["srun_args"] = ["--kill-on-bad-exit=1"]
    for key, value in (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos)):
        if value:
            params[key] = value
    if slurm.mem_gb:
        params["mem"] = f"{slurm.mem_gb}GB"
    if slurm.extra_sbatch:
        params["additional_parameters"] = dict(slurm.extra_sbatch)
    return params


def plan_parameters(
    graph: nx.DiGraph, node_ids: list[str], cluster: Cluster, strict: bool = True
) -> dict[str, dict[str, Any]]:
    """Every node's sbatch parameters, fitted to its partition (one `sinfo` for all): raises SpecError,
    naming each field a user set beyond what the partition offers, before anything is submitted. Not
    `strict` (a dry run): a partition this cluster lacks leaves the values as the spec gives them."""
    planned: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for node_id in node_ids:
        spec = _spec(graph, node_id)
        try:
            planned[node_id] = sbatch_parameters(graph.nodes[node_id]["node"], spec, cluster.partition(spec, strict))
        except SpecError as err:
            problems += [line for line in err.lines if line not in problems]
    if problems:
        raise SpecError([*problems, "(nothing was submitted; lower the value or choose execution.slurm.partition)"])
    return planned


def max_array_size() -> int:
    """MaxArraySize of the cluster (`scontrol show config`), 1001 if it cannot be read."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    match = re.search(r"MaxArraySize\s*=\s*(\d+)", out)
    return int(match.group(1)) if match else 1001


@dataclass
class Submission:
    """What was submitted for one node."""

    node_id: str
    job: Any  # submitit.Job
    finished: bool = False


@dataclass
class SlurmRun:
    run: RunDir
    graph: nx.DiGraph
    submissions: dict[str, Submission] = field(default_factory=dict)
    deferred: list[str] = field(default_factory=list)
    """Evals of intermediate checkpoints the watcher submits once their checkpoint is committed."""
    planned: dict[str, dict[str, Any]] = field(default_factory=dict)
    """sbatch parameters of the deferred nodes."""

    def executor(self, node_id: str, params: dict[str, Any], max_requeues: int) -> submitit.SlurmExecutor:
        folder = (
            self.run.node(base_id(node_id)).root / "slurm" if "[" in node_id else self.run.node(node_id).root / "slurm"
        )
        folder.mkdir(parents=True, exist_ok=True)
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
        ex.update_parameters(**params)
        return ex


def _spec(graph: nx.DiGraph, node_id: str) -> ExperimentSpec:
    spec: ExperimentSpec = graph.nodes[node_id]["spec"]
    return spec


def _dependency(
    deps: list[str], jobs: dict[str, Any], correlated: list[str], any_of: list[str] | None = None
) -> str | None:
    """afterok on upstream jobs, aftercorr on upstream arrays task by task, afterany on a node's own shard
    arrays (the node's job runs even if a shard failed: it redoes what is missing, or fails saying why)."""
    parts = [f"afterok:{jobs[d].job_id}" for d in deps if d in jobs]
    parts += [f"aftercorr:{array_id}" for array_id in correlated]
    parts += [f"afterany:{array_id}" for array_id in any_of or []]
    return ",".join(parts) or None


def submit_all(
    run: RunDir, graph: nx.DiGraph, to_run: list[str], planned: dict[str, dict[str, Any]] | None = None
) -> SlurmRun:
    """Queue every node that must run, dependencies included, in topological order, with the parameters
    `plan_parameters` fitted to the cluster (planned here when not given)."""
    order = [n.id for n in nodes_in_order(graph) if n.id in to_run]
    if planned is None:
        planned = plan_parameters(graph, order, Cluster.query())
    state = SlurmRun(run, graph)
    jobs: dict[str, Any] = {}
    chunk = max(1, max_array_size() - 1)
    groups: dict[str, list[str]] = {}
    for node_id in order:
        groups.setdefault(base_id(node_id), []).append(node_id)
    for base in dict.fromkeys(base_id(n) for n in order):
        members = groups[base]
        specs = [_spec(graph, m) for m in members]
        params = dict(planned[members[0]])
        max_requeues = specs[0].execution.slurm.max_requeues
        # Siblings become one array when only their name differs (the name gets the node id without the branch).
        params["job_name"] = f"trinity:{specs[0].name}:{base}"[:120]
        as_array = len(members) > 1 and all({**planned[m], "job_name": params["job_name"]} == params for m in members)
        sharded = any(shard_count(graph.nodes[m]["node"].kind, s) for m, s in zip(members, specs, strict=True))
        as_array = as_array and not sharded  # a node with shard tasks is submitted alone, after its array
        if not as_array:
            for m in members:
                deps = [d for d in graph.predecessors(m)]
                p = dict(planned[m])
                shards: list[str] = []
                if shard_count(graph.nodes[m]["node"].kind, _spec(graph, m)):  # its shards first, as one array
                    shard_params = {**p, **({"dependency": d} if (d := _dependency(deps, jobs, [])) else {})}
                    folder = run.node(m).root / "slurm"
                    shards = [submit_shards(run, m, _spec(graph, m), shard_params, folder, max_requeues)]
                if (dependency := _dependency(deps, jobs, [], shards)) is not None:
                    p["dependency"] = dependency
                ex = state.executor(m, p, max_requeues)
                jobs[m] = ex.submit(NodeJob(str(run.root), m, p.get("dependency")))
                state.submissions[m] = Submission(m, jobs[m])
            continue
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            shared, correlated = _array_dependencies(graph, part, jobs, groups)
            p = dict(params)
            if (dependency := _dependency(shared, jobs, correlated)) is not None:
                p["dependency"] = dependency
            ex = state.executor(part[0], p, max_requeues)
            with ex.batch():
                submitted = [ex.submit(NodeJob(str(run.root), m, p.get("dependency"))) for m in part]
            for m, job in zip(part, submitted, strict=True):
                jobs[m] = job
                state.submissions[m] = Submission(m, job)
    for m, sub in state.submissions.items():
        _keep_script(run, m, sub.job)
    return state


def _keep_script(run: RunDir, node_id: str, job: Any) -> None:
    """A copy of the sbatch script submitit generated, in the node's own folder."""
    script = Path(job.paths.submission_file)
    if script.is_file():
        target = run.node(node_id).root / "slurm" / f"{job.job_id}_submission.sh"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(script, target)


def _array_dependencies(
    graph: nx.DiGraph, part: list[str], jobs: dict[str, Any], groups: dict[str, list[str]]
) -> tuple[list[str], list[str]]:
    """Dependencies of an array: shared upstream jobs (afterok) and upstream arrays task by task (aftercorr)."""
    shared: set[str] = set()
    correlated: set[str] = set()
    for m in part:
        for dep in graph.predecessors(m):
            if dep not in jobs:
                continue  # reused: nothing to wait for
            siblings = groups.get(base_id(dep), [])
            if len(siblings) > 1 and "[" in dep:
                array_id = str(jobs[dep].job_id).split("_")[0]
                correlated.add(array_id)
            else:
                shared.add(dep)
    return sorted(shared), sorted(correlated)


def settle(run: RunDir, graph: nx.DiGraph, node_id: str, slurm_state: str) -> None:
    """Record a finished job in the node's files (the node writes its own success)."""
    node_dir = run.node(node_id)
    status = NodeStatus.read(node_dir)
    if status.state == "SUCCEEDED":
        return
    attempts = list_attempts(node_dir)
    started = bool(attempts) and attempts[-1].executor == "slurm" and attempts[-1].job_id is not None
    if not started and slurm_state == "CANCELLED":
        status.state, status.message = (
            "DEP_FAILED",
            "its Slurm job was cancelled before it started (a dependency failed, or scancel)",
        )
    else:
        own_message = status.message if status.state == "FAILED" else ""
        status.state, status.message = "FAILED", own_message or f"Slurm job ended {slurm_state}"
        if attempts and attempts[-1].end is None:
            record: AttemptRecord = attempts[-1]
            record.finish(node_dir, "FAILED", record.exit_code, record.signal, f"Slurm job ended {slurm_state}")
    status.write(node_dir)


def reconcile(run: RunDir, graph: nx.DiGraph) -> None:
    """Bring node files up to date with Slurm for jobs that ended while nobody watched (bounded calls;
    nothing changes when Slurm does not answer)."""
    path = run.root / "slurm_jobs.json"
    if not path.is_file() or shutil.which("squeue") is None:
        return
    jobs: dict[str, str] = read_json(path)
    open_nodes = {
        n: j for n, j in jobs.items() if n in graph and NodeStatus.read(run.node(n)).state in ("PENDING", "RUNNING")
    }
    if not open_nodes:
        return
    states = query_jobs(open_nodes.values())
    for node_id, job_id in open_nodes.items():
        job = (states or {}).get(job_id)
        if job is not None and job.state in FINISHED:
            settle(run, graph, node_id, job.state)


def never_started(run: RunDir, node_id: str, job_id: str, reason: str) -> None:
    """A job Slurm will never start: its node fails with the reason (DEP_FAILED when a dependency failed), then
    the job is cancelled, and Slurm cancels its dependants (kill_invalid_depend; else they come here too)."""
    node_dir = run.node(node_id)
    status = NodeStatus.read(node_dir)
    message = f"Slurm will never start job {job_id}: reason {reason} ({explain_reason(reason)})"
    status.state = "DEP_FAILED" if reason == "DependencyNeverSatisfied" else "FAILED"
    if (problem := scancel_jobs([job_id])) is not None:
        message += f"; cancelling it failed, cancel it by hand ({problem})"
    status.message = message
    status.write(node_dir)


def watch(state: SlurmRun, on_tick: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> dict[str, str]:
    """Poll until every submitted job has finished or can never start; returns the final node states.

    Raises RunError when Slurm has not answered for UNANSWERED_LIMIT_S (the jobs stay queued)."""
    pending = {node_id: str(sub.job.job_id) for node_id, sub in state.submissions.items()}
    never_since: dict[str, float] = {}
    answered = clock()
    while pending or state.deferred:
        pending.update({n: str(state.submissions[n].job.job_id) for n in submit_deferred(state)})
        if not pending:
            on_tick()
            time.sleep(POLL_S)
            continue
        states = query_jobs(pending.values())
        now = clock()
        if states is None:
            if now - answered > UNANSWERED_LIMIT_S:
                raise RunError(
                    f"Slurm did not answer squeue/sacct for {UNANSWERED_LIMIT_S:.0f} s; its jobs stay queued "
                    f"({', '.join(pending.values())}). Follow them with `trinity status {state.run.root}`, "
                    f"or stop them with `trinity cancel {state.run.root}`."
                )
        else:
            answered = now
            for node_id, job_id in list(pending.items()):
                if _settled(state, node_id, job_id, states.get(job_id), now, never_since):
                    del pending[node_id]
                    state.submissions[node_id].finished = True
        on_tick()
        if pending or state.deferred:
            time.sleep(POLL_S)
    on_tick()
    return {n: NodeStatus.read(state.run.node(n)).state for n in state.graph.nodes}


def _settled(
    state: SlurmRun, node_id: str, job_id: str, job: JobState | None, now: float, never_since: dict[str, float]
) -> bool:
    """Whether the watcher is done with a node's job: it finished, or it can never start."""
    if job is None:  # not visible yet (or purged): ask again
        return False
    if job.state in FINISHED:
        settle(state.run, state.graph, node_id, job.state)
        return True
    if job.state == "PENDING" and never_starts(job.reason):
        since = never_since.setdefault(node_id, now)
        if now - since >= NEVER_GRACE_S:
            never_started(state.run, node_id, job_id, job.reason)
            return True
        return False
    never_since.pop(node_id, None)
    return False


def execute_slurm(
    run: RunDir, graph: nx.DiGraph, decisions: dict[str, Decision], on_tick: Callable[[], None], wait: bool = True
) -> dict[str, str]:
    """Queue the nodes that must run; with `wait`, watch them until the graph settles. Every job's resources
    are fitted to its partition (and refused beyond it) before any node is touched or submitted."""
    if shutil.which("sbatch") is None:
        raise RunError(
            "sbatch is not on PATH: this machine has no Slurm client (for a local cluster: "
            "scripts/slurm-local.sh up, then export SLURM_CONF=...)"
        )
    order = [n for n in nodes_in_order(graph) if decisions[n.id].action == "run"]
    planned = plan_parameters(graph, [n.id for n in order], Cluster.query())
    for node in order:
        supersede(run, node)
        mark_pending(run, node)
    ids = {n.id for n in order}
    later = [n.id for n in order if wait and n.after_checkpoint is not None and n.after_checkpoint.node in ids]
    state = submit_all(run, graph, [n.id for n in order if n.id not in later], planned)
    state.deferred, state.planned = later, {n: planned[n] for n in later}
    _write_jobs(run, state)
    if not wait:
        return {n: NodeStatus.read(run.node(n)).state for n in graph.nodes}
    return watch(state, on_tick)


def submit_deferred(state: SlurmRun) -> list[str]:
    """Submit the deferred evals whose checkpoint is now committed (afterok on their other dependencies still
    queued); a deferred eval whose training node ended without that checkpoint becomes DEP_FAILED. Returns the
    nodes submitted."""
    submitted: list[str] = []
    for node_id in list(state.deferred):
        after = during.after_checkpoint(state.graph, node_id)
        assert after is not None
        if not during.ready(state.run, state.graph, node_id):
            failed = [
                d
                for d in state.graph.predecessors(node_id)
                if NodeStatus.read(state.run.node(d)).state in ("FAILED", "DEP_FAILED")
                and not (d == after.node and during.committed(state.run, after))
            ]
            if failed:  # it can never start
                status = NodeStatus.read(state.run.node(node_id))
                status.state, status.message = (
                    "DEP_FAILED",
                    f"dependency {failed[0]} failed (before checkpoint {after.step})",
                )
                status.write(state.run.node(node_id))
                state.deferred.remove(node_id)
            continue
        params = dict(state.planned[node_id])
        queued = {
            d: state.submissions[d].job
            for d in state.graph.predecessors(node_id)
            if d != after.node and d in state.submissions and not state.submissions[d].finished
        }
        if (dependency := _dependency(list(queued), queued, [])) is not None:
            params["dependency"] = dependency
        ex = state.executor(node_id, params, _spec(state.graph, node_id).execution.slurm.max_requeues)
        job = ex.submit(NodeJob(str(state.run.root), node_id, params.get("dependency")))
        state.submissions[node_id] = Submission(node_id, job)
        _keep_script(state.run, node_id, job)
        state.deferred.remove(node_id)
        submitted.append(node_id)
    if submitted:
        _write_jobs(state.run, state)
    return submitted


def _write_jobs(run: RunDir, state: SlurmRun) -> None:
    """RUN/slurm_jobs.json: node -> job id of this submission (for `trinity cancel` and `status`)."""
    from trinity.run.layout import atomic_write_json

    path = run.root / "slurm_jobs.json"
    jobs = read_json(path) if path.is_file() else {}
    jobs.update({n: str(s.job.job_id) for n, s in state.submissions.items()})
    atomic_write_json(path, jobs)


def cancel(run: RunDir, node_id: str | None = None) -> list[str]:
    """scancel the jobs of the run (or of one node); returns the job ids cancelled."""
    path = run.root / "slurm_jobs.json"
    if not path.is_file():
        raise RunError(f"{run.root}: no Slurm jobs were submitted for this run")
    jobs: dict[str, str] = read_json(path)
    chosen = {node_id: jobs[node_id]} if node_id else jobs
    if node_id and node_id not in jobs:
        raise RunError(f"{run.root}: node {node_id!r} has no Slurm job (nodes with jobs: {', '.join(jobs)})")
    ids = [j for n, j in chosen.items() if NodeStatus.read(run.node(n)).state not in ("SUCCEEDED",)]
    arrays = shard_arrays(run)  # a prepare node's shard tasks go with it
    ids += [arrays[n] for n in chosen if n in arrays and NodeStatus.read(run.node(n)).state != "SUCCEEDED"]
    if (problem := scancel_jobs(ids, timeout_s=60)) is not None:
        raise RunError(f"{run.root}: {problem}")
    return ids


def dry_run(graph: nx.DiGraph) -> list[dict[str, Any]]:
    """The sbatch parameters each node would be submitted with, fitted to this machine's cluster as a run would
    (as the spec gives them where the cluster is unreachable or lacks the spec's partition)."""
    planned = plan_parameters(graph, [n.id for n in nodes_in_order(graph)], Cluster.query(), strict=False)
    rows = []
    for node in nodes_in_order(graph):
        params = dict(planned[node.id])
        params["dependency"] = ",".join(f"afterok:<{d}>" for d in node.deps) or None
        rows.append({"node": node.id, **params})
    return rows
