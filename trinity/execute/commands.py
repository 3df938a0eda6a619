"""`trinity run`, `resume`, `status` and `explain`: the run-level operations behind the CLI.

`status` and `explain` judge a RUNNING node by the same rule as `resume` (trinity.run.status:
lease_liveness): `status` reports each RUNNING node's `live` and `why`, so a dead node is shown as
such. A node left RUNNING by a scheduler that was killed is stopping at a checkpoint by itself:
`run`/`resume` wait for it (at most the stop grace period) before they decide again.
"""

from __future__ import annotations

import fnmatch
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import networkx as nx
from rich.console import Console
from rich.markup import escape

from trinity.errors import RunError
from trinity.execute.closeout import close_dead_attempts
from trinity.execute.display import RunDisplay, node_table
from trinity.execute.local import STOP_GRACE_S, LocalExecutor
from trinity.execute.provenance import code_changes
from trinity.execute.run import (
    Decision,
    Origin,
    RunLock,
    check_origin,
    decide,
    default_run_dir,
    dropped_nodes,
    publish_held,
    reuse_from_store,
    write_run,
)
from trinity.execute.scheduler import SchedulerStopped, execute
from trinity.run.graph import RunGraph
from trinity.run.layout import RunDir, read_json
from trinity.run.status import Liveness, NodeStatus, lease_liveness, lease_stall, list_attempts
from trinity.spec.loading import LoadedSpec, load_experiment


def select(graph: nx.DiGraph, patterns: list[str] | None) -> nx.DiGraph:
    """The nodes matching any pattern in `patterns` (`matches`), with everything they depend on (all if None)."""
    if not patterns:
        return graph
    chosen = {n for p in patterns for n in matches(graph.nodes, p)}
    if not chosen:
        raise RunError(f"--nodes {' '.join(patterns)} matches no node (nodes: {', '.join(sorted(graph.nodes))})")
    for n in list(chosen):
        chosen |= nx.ancestors(graph, n)
    return graph.subgraph(chosen).copy()


def matches(node_ids: Iterable[str], pattern: str) -> set[str]:
    """The ids `pattern` selects: the id it equals, if there is one; else every id it matches as a glob
    (`*`, `?`), where `[...]` matches either literally or as a character class.

    Sweep branches carry their label in brackets (`pretrain/phase2[muon.lr=0.02]`): fnmatch alone reads
    those as a character class, so the id as printed would select nothing, and `pretrain/*[muon.lr=0.02]`
    no branch. Reading brackets both ways keeps classes (`pretrain/phase[12]`) working too."""
    ids = list(node_ids)
    if pattern in ids:
        return {pattern}
    literal = re.sub(r"[\[\]]", lambda m: f"[{m.group()}]", pattern)
    return {n for n in ids if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, literal)}


def run_loaded(
    loaded: LoadedSpec,
    run_dir: Path,
    console: Console,
    nodes: list[str] | None = None,
    jobs: int = 1,
    wait: bool = True,
    detach: bool = False,
    origin: Origin | None = None,
    force: bool = False,
) -> int:
    """Write/refresh the run directory, decide, execute; returns the exit status. Raises SchedulerStopped
    (trinity.execute.scheduler) when a signal stopped the run.

    origin: what `trinity run` was given (None for a resume): judged against run.json's first
    (`check_origin`: another graph file or a forgotten `--set` that would supersede nodes needs `force`),
    then remembered there. Prints one line per node: why it runs or is reused (`explain`'s reason)."""
    run = RunDir(run_dir.resolve())
    with RunLock(run):
        from trinity.graph.compile import compile_graph

        compiled = compile_graph(loaded)
        if origin is not None:
            for line in check_origin(run, origin, select(compiled, nodes), force, compiled):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
        run, full = write_run(loaded, run.root, origin, compiled)
        graph = select(full, nodes)
        decisions = wait_for_stopping(run, graph, decide(run, graph), console)
        busy = [d for d in decisions.values() if d.action == "busy"]
        if busy:
            raise RunError("; ".join(f"{d.node}: {d.reason}" for d in busy) + " — stop it before re-running")
        from trinity.store.compaction import compact_run  # finished attempts' parts: one per table

        compacted = compact_run(run.root)
        if compacted.attempts:
            n, parts = len(compacted.attempts), f"{compacted.parts_before} -> {compacted.parts_after}"
            console.print(f"telemetry of {n} finished attempt(s) compacted: {parts} parts", highlight=False)
        decisions = reuse_from_store(run, graph, decisions)  # before any executor: none runs or submits them
        for line in publish_held(run, graph, decisions):  # what this run already holds, shared too
            console.print(line, highlight=False, markup=False)
        reused = {n for n, d in decisions.items() if d.action == "reuse"}
        to_run = [n for n, d in decisions.items() if d.action == "run"]
        console.print(f"run directory: {run.root}", highlight=False, markup=False)
        console.print(f"{len(to_run)} node(s) to run, {len(reused)} reused", highlight=False)
        for d in decisions.values():
            console.print(f"  {d.node}: {why(d)}", highlight=False, markup=False, soft_wrap=True)
        order = [n for n in nx.lexicographical_topological_sort(graph)]
        slurm = loaded.spec.execution.executor == "slurm"
        with RunDisplay(run, order, reused, console) as display:
            if slurm:
                from trinity.execute.slurm import execute_slurm

                try:
                    states = execute_slurm(run, graph, decisions, on_tick=display.tick, wait=wait)
                except KeyboardInterrupt:  # the jobs are Slurm's: Ctrl-C stops the watching, never a job
                    raise slurm_watch_stopped(run) from None
            else:
                executor = LocalExecutor(run, detach=detach)

                def say(line: str) -> None:  # what a stop signal does, shown at once
                    console.print(line, highlight=False, markup=False, soft_wrap=True)

                states = execute(run, graph, decisions, executor, jobs, display.tick, detach, say)
    if slurm and not wait:
        console.print(
            f"submitted {len(to_run)} node(s) to Slurm; follow with `trinity status {run.root}`",
            highlight=False,
            markup=False,
        )
        return 0
    if not console.is_terminal:
        console.print(node_table(run, order, reused))
    failed = [n for n, s in states.items() if s != "SUCCEEDED"]
    if failed:
        advice = f"See `trinity status {run.root}`; continue with `trinity resume {run.root}`."
        what = escape(f"{', '.join(failed)}. {advice}")
        console.print(f"[red]{len(failed)} node(s) did not succeed[/]: {what}", highlight=False, emoji=False)
        return 1
    query = escape(f'trinity sql {run.root} "select node, step, loss from steps order by node, step"')
    console.print(f"[green]all {len(states)} node(s) SUCCEEDED[/]. Telemetry: {query}", highlight=False)
    return 0


def slurm_watch_stopped(run: RunDir) -> SchedulerStopped:
    """What a Ctrl-C while `trinity run` watches its Slurm jobs did: the watching stopped at once (one Ctrl-C
    is enough); every job stays queued or running, and the node files follow them (`status`, `watch`)."""
    jobs_file = run.root / "slurm_jobs.json"
    jobs: dict[str, str] = read_json(jobs_file) if jobs_file.is_file() else {}
    live = sorted(n for n in jobs if NodeStatus.read(run.node(n)).state in ("PENDING", "RUNNING"))
    listed = f"{len(live)} node(s) ({', '.join(live)})" if live else "no node"
    message = (
        f"stopped watching; the Slurm jobs were not touched: {listed} still queued or running. "
        f"Follow them with `trinity watch {run.root}` or `trinity status {run.root}`; "
        f"stop them with `trinity cancel {run.root}`"
    )
    return SchedulerStopped(signal.SIGINT, live, message)


def why(decision: Decision) -> str:
    """One line: whether the node runs or is reused, and why (the reason `trinity explain` gives)."""
    if decision.action == "reuse":
        return decision.reason if decision.reason.startswith("reused") else f"reused: {decision.reason}"
    return f"runs: {decision.reason}"


def wait_for_stopping(
    run: RunDir, graph: nx.DiGraph, decisions: dict[str, Decision], console: Console, grace_s: float = STOP_GRACE_S
) -> dict[str, Decision]:
    """Nodes whose scheduler was killed commit a checkpoint and exit by themselves: wait for that (at most
    `grace_s`), then decide again. Refuses, naming the node, one that has not stopped by then."""
    stopping = [d for d in decisions.values() if d.action == "stopping"]
    if not stopping:
        return decisions
    names = ", ".join(d.node for d in stopping)
    console.print(
        f"waiting (at most {grace_s:.0f} s) for {names} to stop at a checkpoint: {stopping[0].reason}",
        highlight=False,
        markup=False,
    )
    deadline = time.monotonic() + grace_s
    while stopping and time.monotonic() < deadline:
        time.sleep(0.2)
        decisions = decide(run, graph)
        stopping = [d for d in decisions.values() if d.action == "stopping"]
    if stopping:
        raise RunError(
            "; ".join(f"{d.node}: {d.reason}" for d in stopping)
            + f" — it did not stop within {grace_s:.0f} s: stop that process (kill PID), then resume"
        )
    return decisions


def run_graph(
    graph_file: Path,
    sets: list[str],
    run_dir: Path | None,
    console: Console,
    nodes: list[str] | None = None,
    jobs: int = 1,
    wait: bool = True,
    detach: bool = False,
    force: bool = False,
) -> int:
    """`trinity run GRAPH [--set ...]`: run.json remembers the graph file and `sets` (`run_loaded`);
    `force` lets another graph, or a remembered `--set` left out, supersede nodes."""
    loaded = load_experiment(graph_file, sets)
    root = run_dir or default_run_dir(loaded.spec)
    return run_loaded(loaded, root, console, nodes, jobs, wait, detach, Origin.of(loaded, sets), force)


def dry_run(
    graph_file: Path, sets: list[str], nodes: list[str] | None = None, run_dir: Path | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """What `trinity run` would do, without running, submitting or writing anything: (the executor, one row per
    node with `action` (run or reuse, as `decide` judges the run directory as it stands; every node runs when it
    does not exist yet) and `why`, plus, on Slurm, the sbatch parameters it would be submitted with)."""
    from trinity.execute.slurm import dry_run as slurm_dry_run
    from trinity.graph.compile import compile_graph, nodes_in_order

    loaded = load_experiment(graph_file, sets)
    graph = select(compile_graph(loaded), nodes)
    run = RunDir((run_dir or default_run_dir(loaded.spec)).resolve())
    if run.run_json.is_file():
        decisions = decide(run, graph)
    else:
        fresh = f"{run.root} does not exist yet"
        decisions = {n.id: Decision(n.id, "run", fresh) for n in nodes_in_order(graph)}
    executor = loaded.spec.execution.executor
    params = {row["node"]: row for row in slurm_dry_run(graph)} if executor == "slurm" else {}
    rows = [
        {**params.get(node_id, {}), "node": node_id, "action": d.action, "why": why(d)}
        for node_id, d in decisions.items()
    ]
    return executor, rows


def load_run_spec(run: RunDir) -> LoadedSpec:
    """The run's own resolved spec (spec.yaml), with the run's base folder for data paths."""
    RunGraph.load(run)  # refuses a folder that is not a run
    meta = read_json(run.run_json)
    return load_experiment(run.spec_yaml, base=Path(meta["base_dir"]))


def resume_run(
    run_dir: Path,
    console: Console,
    nodes: list[str] | None = None,
    jobs: int = 1,
    wait: bool = True,
    detach: bool = False,
) -> int:
    run = RunDir(run_dir.resolve())
    return run_loaded(load_run_spec(run), run.root, console, nodes, jobs, wait, detach)


def cancel_run(run_dir: Path, node_id: str | None) -> list[str]:
    """Cancel the run's running nodes (or those `node_id` selects: an id or a glob, as --nodes); lines to show.

    A Slurm run: scancel their jobs, then update the node files from Slurm. A local run: stop each running
    node at a checkpoint (trinity.execute.local: cancel_local), whoever launched it."""
    run = RunDir(run_dir.resolve())
    if not (run.root / "slurm_jobs.json").is_file():
        from trinity.execute.local import cancel_local

        graph_nodes = RunGraph.load(run).nodes
        chosen = sorted(graph_nodes) if node_id is None else sorted(matches(graph_nodes, node_id))
        if not chosen:
            raise RunError(f"{run.root}: no node {node_id!r} (nodes: {', '.join(sorted(graph_nodes))})")
        lines = cancel_local(run, chosen)
        if not lines:
            return [f"no node of {run.root} is running ({', '.join(chosen)} checked): nothing to cancel"]
        return [*lines, f"continue with `trinity resume {run.root}`"]
    return [f"cancelled {len(ids)} job(s): {', '.join(ids) or 'none running'}" for ids in [_cancel_slurm(run, node_id)]]


def _cancel_slurm(run: RunDir, node_id: str | None) -> list[str]:
    from trinity.execute.slurm import cancel, reconcile
    from trinity.graph.compile import compile_graph

    ids = cancel(run, node_id)
    graph = compile_graph(load_run_spec(run))
    with_jobs = [n for n in read_json(run.root / "slurm_jobs.json") if n in graph]
    for _ in range(30):  # let Slurm record the cancellation (and cancel the dependants), then settle the nodes
        time.sleep(1)
        reconcile(run, graph)
        if all(NodeStatus.read(run.node(n)).state not in ("RUNNING", "PENDING") for n in with_jobs):
            break
    return ids


def explain(run_dir: Path, node_id: str, graph_file: Path | None = None, sets: Sequence[str] = ()) -> Decision:
    """Why `node_id` will run or be reused: on `trinity resume` (the run's stored spec), or, given `graph_file`
    (and `sets`), on `trinity run GRAPH_FILE --run-dir RUN_DIR [--set ...]` (an edited or another graph)."""
    run = RunDir(run_dir.resolve())
    loaded = load_run_spec(run) if graph_file is None else load_experiment(graph_file, list(sets))
    if graph_file is not None:
        RunGraph.load(run)  # refuses a folder that is not a run
    from trinity.graph.compile import compile_graph

    graph = compile_graph(loaded)
    if node_id not in graph:
        if graph_file is not None and node_id in dropped_nodes(run, graph):
            raise RunError(
                f"{graph_file} has no node {node_id!r}: `trinity run {graph_file} --run-dir {run_dir}` would move "
                f"its folder to {run.root / 'superseded'}/ (kept there, and in SQL's *_history views)"
            )
        raise RunError(f"{run.root}: no node {node_id!r} (nodes: {', '.join(sorted(graph.nodes))})")
    return decide(run, graph.subgraph(nx.ancestors(graph, node_id) | {node_id}))[node_id]


def _stalled(liveness: Liveness | None) -> str | None:
    """Why a live RUNNING node's steps stopped advancing (execution.watchdog; lease_stall), or None."""
    if liveness is None or not liveness.live or liveness.lease is None:
        return None
    return lease_stall(liveness.lease)


def status_report(run_dir: Path) -> dict[str, Any]:
    """Every node's state, attempts and progress; a RUNNING node's `live` (its process lives, by the lease
    rule), `why`, `stopping` (live, but its scheduler is gone) and `stalled` (live, but its steps stopped
    advancing: why, else None). `live` is None for other states.
    `code_changed`: each node whose latest attempt ran other code than earlier ones (provenance.CodeChange)."""
    run = RunDir(run_dir.resolve())
    graph = RunGraph.load(run)
    if (run.root / "slurm_jobs.json").is_file():  # jobs may have ended while nobody watched
        from trinity.execute.slurm import reconcile
        from trinity.graph.compile import compile_graph

        reconcile(run, compile_graph(load_run_spec(run)))
    nodes, code_changed = [], []
    for node_id, entry in graph.nodes.items():
        node_dir = run.node(node_id)
        close_dead_attempts(node_dir)  # a killed attempt nobody watched ends KILLED, not RUNNING forever
        status = NodeStatus.read(node_dir)
        attempts = list_attempts(node_dir)
        if (change := code_changes(node_id, attempts)) is not None:
            code_changed.append(change.as_json())
        liveness = lease_liveness(node_dir, status.attempt) if status.state == "RUNNING" else None
        nodes.append(
            {
                "id": node_id,
                "kind": entry.kind,
                "state": status.state,
                "live": None if liveness is None else liveness.live,
                "why": "" if liveness is None else liveness.why,
                "stopping": liveness is not None and liveness.orphaned,
                "stalled": _stalled(liveness),
                "identity": entry.identity,
                "message": status.message,
                "progress": status.progress,
                "attempts": [asdict(a) for a in attempts],
            }
        )
    return {"run": read_json(run.run_json), "root": str(run.root), "nodes": nodes, "code_changed": code_changed}
