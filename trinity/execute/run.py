"""Create or reuse a run directory, and decide for every node whether it runs or is reused.

A node is reused when it SUCCEEDED with the identity it has now and nothing upstream runs, or, with
`execution.store` set, when it would run but the shared store holds a committed entry of its identity
(trinity.run.shared_store): `reuse_from_store` then links the entry's outputs into its folder (hard
links, nothing copied), with an attempt record of executor "store" and `reused_from`, before any
executor starts (so the local and Slurm executors alike run nothing and submit nothing for it).
Otherwise it runs, and `explain` says why: never ran, failed, died (its lease is not live, and
why), identity changed (and which parts of its spec), or an upstream node runs. A RUNNING node whose
lease is live is busy; one whose scheduler is gone is stopping (it commits a checkpoint and exits by
itself: `trinity resume` waits for it). A node whose identity changed
has its old folder moved to RUN/superseded/ first: its checkpoints belong to another result
and must not be resumed, but nothing trained is ever deleted (the catalog's `*_history` views keep its
rows, with the identity it had). So has the folder of a node the new graph no longer has (`dropped`:
another graph file, an edit that removed a stage, a sweep whose node ids changed).

run.json remembers how the run was made (`Origin`: the graph file, the `--set` list, the resolved spec's
hash; earlier ones in `origins`). `check_origin` judges a new `trinity run` against it before anything is
written: another graph file that would supersede nodes is refused without `--force` (naming them), and a
remembered `--set` left out this time is refused the same way when it would supersede nodes (a warning
otherwise). It is not re-applied: the command line a user types stays the whole description of the run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import networkx as nx
import yaml

import trinity
from trinity.errors import RunError
from trinity.graph.compile import Node, branches, compile_graph, nodes_in_order
from trinity.graph.diff import flatten
from trinity.graph.identity import canonical_json
from trinity.run.graph import GraphNode, RunGraph
from trinity.run.layout import NodeDir, RunDir, atomic_write_json, atomic_write_text, read_json
from trinity.run.shared_store import Placed, SharedStore, link_entry
from trinity.run.status import AttemptRecord, NodeStatus, lease_liveness, list_attempts, next_attempt, now_iso
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.loading import LoadedSpec
from trinity.spec.yaml_source import dump_yaml

Action = Literal["reuse", "run", "busy", "stopping"]


@dataclass(frozen=True)
class Origin:
    """How a run directory was made: what `trinity run` was given (run.json's graph_file, sets, spec_sha256)."""

    graph_file: str
    sets: tuple[str, ...]
    spec_sha256: str

    @staticmethod
    def of(loaded: LoadedSpec, sets: list[str] | tuple[str, ...]) -> Origin:
        return Origin(str(loaded.path.resolve()), tuple(sets), spec_sha256(loaded.spec))

    def to_json(self) -> dict[str, object]:
        return {"graph_file": self.graph_file, "sets": list(self.sets), "spec_sha256": self.spec_sha256}


def spec_sha256(spec: ExperimentSpec) -> str:
    """The hash of a resolved spec (every field, defaults included): equal hashes, equal specs."""
    return hashlib.sha256(canonical_json(spec.model_dump(mode="json", by_alias=True)).encode()).hexdigest()


def _set_key(assignment: str) -> str:
    return assignment.split("=", 1)[0].strip()


def would_supersede(run: RunDir, graph: nx.DiGraph) -> list[str]:
    """The nodes of `graph` whose folder holds another identity (not merely PENDING): running them moves
    that folder to RUN/superseded/ (`supersede`)."""
    out = []
    for node in nodes_in_order(graph):
        status = NodeStatus.read(run.node(node.id))
        if status.identity and status.identity != node.identity and status.state != "PENDING":
            out.append(node.id)
    return out


def dropped_nodes(run: RunDir, graph: nx.DiGraph) -> list[str]:
    """The nodes of the run's graph.json that `graph` (the whole new graph) no longer has and whose folder
    exists: `write_run` moves those folders to RUN/superseded/ (`set_aside`)."""
    if not run.graph_json.is_file():
        return []
    old = RunGraph.load(run).nodes
    kept = [str(m) for m in graph]
    # A folder that holds a kept node's folder (`x` around `x/y`) stays where it is.
    return [
        n for n in old if n not in graph and run.node(n).root.exists() and not any(m.startswith(n + "/") for m in kept)
    ]


def check_origin(
    run: RunDir, origin: Origin, graph: nx.DiGraph, force: bool, full: nx.DiGraph | None = None
) -> list[str]:
    """Judge a `trinity run` of `origin` into an existing run directory before anything is written; returns
    the lines to print. Raises RunError (without `force`) when another graph file, or a remembered `--set`
    left out, would supersede nodes of `graph` (the selected nodes), or another graph file drops nodes of
    `full` (the whole new graph; default `graph`): those are named, with what to do."""
    if not run.run_json.is_file():
        return []
    meta = read_json(run.run_json)
    said: list[str] = []
    gone = dropped_nodes(run, graph if full is None else full)
    doomed = would_supersede(run, graph) + gone
    moved = f"{len(doomed)} node(s) ({', '.join(doomed)}) to {run.root / 'superseded'}/"
    old_file = meta.get("graph_file")
    if isinstance(old_file, str) and old_file != origin.graph_file:
        if doomed and not force:
            raise RunError(
                f"{run.root} was made from {old_file}; running {origin.graph_file} into it would supersede {moved} "
                "(kept there, and in SQL's *_history views). Pass --force to do so, or give another --run-dir"
            )
        said.append(f"note: {run.root} was made from {old_file}; now from {origin.graph_file}")
    elif gone:
        kept = f"{run.root / 'superseded'}/ (kept there, and in SQL's *_history views)"
        said.append(f"note: {len(gone)} node(s) no longer in the graph ({', '.join(gone)}) move to {kept}")
    remembered = meta.get("sets")
    if isinstance(remembered, list):
        keys = {_set_key(s) for s in origin.sets}
        dropped = [str(s) for s in remembered if _set_key(str(s)) not in keys]
        if dropped:
            again = " ".join(f"--set {s}" for s in dropped)
            if doomed and not force:
                raise RunError(
                    f"{run.root} was made with {again}, not given this time: running without it would supersede "
                    f"{moved}. Add {again} to run as before, or pass --force to run without it"
                )
            said.append(f"warning: {run.root} was made with {again}, not given this time (not re-applied)")
    if doomed and force:
        said.append(f"--force: superseding {moved}")
    return said


def record_origin(meta: dict[str, object], origin: Origin) -> None:
    """Set run.json's graph_file, sets and spec_sha256 to `origin`; the earlier ones stay in `origins`."""
    entry = origin.to_json()
    history = meta.get("origins")
    origins = list(history) if isinstance(history, list) else []
    if not origins or {k: v for k, v in origins[-1].items() if k != "at"} != entry:
        origins.append(entry | {"at": now_iso()})
    meta.update(entry, origins=origins)


@dataclass(frozen=True)
class Decision:
    node: str
    action: Action
    reason: str
    entry: str | None = None
    """A "reuse" from the shared store: the committed entry whose outputs the node takes."""


def default_run_dir(spec: ExperimentSpec) -> Path:
    """runs/<name>: running the same graph again continues the same run."""
    return Path(spec.execution.run_root) / spec.name


def payload_digests(node: Node) -> dict[str, str]:
    """A short digest of each top-level part of a node's identity payload (for `explain`)."""
    return {k: hashlib.sha256(canonical_json(v).encode()).hexdigest()[:12] for k, v in node.payload.items()}


def write_run(
    loaded: LoadedSpec, root: Path, origin: Origin | None = None, graph: nx.DiGraph | None = None
) -> tuple[RunDir, nx.DiGraph]:
    """Create `root` (or update it) with run.json, spec.yaml, branch specs and graph.json.

    origin: how `trinity run` made it (None: a resume, or a caller that does not say; run.json's is kept).
    graph: `compile_graph(loaded)` when the caller has it already."""
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    graph = compile_graph(loaded) if graph is None else graph
    gone = dropped_nodes(run, graph)
    for node_id in gone:  # before anything is written: a live one keeps its folder (its process writes there)
        status = NodeStatus.read(run.node(node_id))
        if status.state == "RUNNING" and lease_liveness(run.node(node_id), status.attempt).live:
            raise RunError(
                f"{node_id} is not in the new graph but still runs (a live heartbeat): stop it first "
                f"(`trinity cancel {run.root} {node_id}`), then run again; its folder then moves to superseded/"
            )
    from trinity.nodes.init_source import check_init_architectures  # here: it loads torch

    check_init_architectures(loaded, graph)  # `init:` sources of another shape (trinity.nodes.init_source)
    if not run.run_json.is_file():
        atomic_write_json(
            run.run_json,
            {
                "run_id": f"{loaded.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                "name": loaded.spec.name,
                "created": now_iso(),
                "trinity_version": trinity.__version__,
            },
        )
    meta = read_json(run.run_json)
    if origin is not None:
        record_origin(meta, origin)
    elif loaded.path.resolve() != run.spec_yaml.resolve():  # a resume re-reads spec.yaml: keep the origin
        meta["graph_file"] = str(loaded.path.resolve())
    meta.update(base_dir=str(loaded.base_dir), updated=now_iso())
    store = SharedStore.of(loaded.spec.execution.store)  # relative to the working directory, like run_root
    if store is not None:
        meta["store"] = str(store.root)
    else:
        meta.pop("store", None)
    atomic_write_json(run.run_json, meta)
    atomic_write_text(run.spec_yaml, dump_yaml(loaded.spec.model_dump(mode="json", by_alias=True)))
    spec_files: dict[str, str] = {}
    for i, branch in enumerate(branches(loaded)):
        name = "spec.yaml" if loaded.spec.sweep is None else f"branches/{i:03d}.yaml"
        if loaded.spec.sweep is not None:
            atomic_write_text(
                root / name, yaml.safe_dump(branch.spec.model_dump(mode="json", by_alias=True), sort_keys=False)
            )
        spec_files[branch.label] = name
    first_label = next(iter(spec_files))
    nodes = []
    for node in nodes_in_order(graph):
        spec: ExperimentSpec = graph.nodes[node.id]["spec"]
        # A node shared by several sweep branches has the same identity in each: it runs with the first one's spec.
        label = graph.nodes[node.id]["branch_label"] or first_label
        flat = {k: v for k, (v, _) in flatten(spec).items()}
        nodes.append(
            GraphNode(
                id=node.id,
                kind=node.kind,
                identity=node.identity,
                deps=node.deps,
                target=node.target,
                branch=node.branch,
                spec_file=spec_files[label],
                flat_spec=flat,
                payload_digests=payload_digests(node),
                after_checkpoint=node.after_checkpoint,
            ).to_json()
        )
    for node_id in gone:
        set_aside(run, node_id, "dropped")
    atomic_write_json(run.graph_json, {"name": loaded.spec.name, "nodes": nodes})
    return run, graph


def decide(run: RunDir, graph: nx.DiGraph) -> dict[str, Decision]:
    """For each node, in topological order: reuse, run, busy (running in another live process) or stopping
    (live, but its scheduler is gone: it stops at a checkpoint by itself)."""
    decisions: dict[str, Decision] = {}
    store = run_store(run)
    for node in nodes_in_order(graph):
        status = NodeStatus.read(run.node(node.id))
        upstream = [d for d in node.deps if decisions[d].action != "reuse" and not _reads_fixed_checkpoint(node, d)]
        decision = _decide_one(run, node, status, upstream)
        if decision.action == "run" and store is not None:
            decision = _from_store(store, node, decision)
        decisions[node.id] = decision
    return decisions


def _reads_fixed_checkpoint(node: Node, dep: str) -> bool:
    """Whether `node` reads only the committed checkpoint at one step of `dep` (an eval during training), which
    a re-run of `dep` with the same identity reproduces bit for bit (resume is exact) and never changes: then
    `dep` running again is no reason to evaluate that checkpoint again."""
    return node.after_checkpoint is not None and node.after_checkpoint.node == dep


def run_store(run: RunDir) -> SharedStore | None:
    """The run's shared store: `execution.store` as resolved when the run was written (run.json's `store`)."""
    if not run.run_json.is_file():
        return None
    path = read_json(run.run_json).get("store")
    return SharedStore(Path(path)) if path else None


def _from_store(store: SharedStore, node: Node, decision: Decision) -> Decision:
    """A node that would run is reused from the store when it holds a whole entry of its identity."""
    found = store.find(node.identity)
    if found.usable:
        reason = f"reused from {found.path} (the shared store; otherwise it would run: {decision.reason})"
        return Decision(node.id, "reuse", reason, entry=str(found.path))
    if found.problem is not None:
        return Decision(
            node.id, "run", f"{decision.reason}; the store's entry {found.path} is not reused: {found.problem}"
        )
    return decision


def _decide_one(run: RunDir, node: Node, status: NodeStatus, upstream: list[str]) -> Decision:
    node_dir = run.node(node.id)
    liveness = lease_liveness(node_dir, status.attempt) if status.state == "RUNNING" else None
    if liveness is not None and liveness.orphaned:
        return Decision(node.id, "stopping", f"RUNNING in attempt {status.attempt} as {liveness.why}")
    if liveness is not None and liveness.live:
        return Decision(node.id, "busy", f"RUNNING in attempt {status.attempt} with a live heartbeat ({liveness.why})")
    if status.identity and status.identity != node.identity and status.state != "PENDING":
        changed = _changed_parts(node_dir, node)
        return Decision(
            node.id, "run", f"its identity changed ({changed}); was {status.identity[:12]}, now {node.identity[:12]}"
        )
    if upstream:
        return Decision(node.id, "run", f"upstream {', '.join(upstream)} will run")
    if status.state == "SUCCEEDED":
        attempts = list_attempts(node_dir)
        if attempts and attempts[-1].reused_from:
            how = f"reused from {attempts[-1].reused_from} in attempt {attempts[-1].attempt}"
            return Decision(node.id, "reuse", f"{how}, with identity {node.identity[:12]}, unchanged")
        return Decision(
            node.id, "reuse", f"SUCCEEDED in attempt {status.attempt} with identity {node.identity[:12]}, unchanged"
        )
    resume = _resume_note(node_dir)
    if status.state == "FAILED":
        return Decision(node.id, "run", f"FAILED in attempt {status.attempt}: {status.message}{resume}")
    if liveness is not None:  # RUNNING, and not live
        return Decision(node.id, "run", f"died in attempt {status.attempt} ({liveness.why}){resume}")
    if status.state == "DEP_FAILED":
        return Decision(node.id, "run", "a dependency had failed; it never ran")
    return Decision(node.id, "run", "it never ran")


def _changed_parts(node_dir: NodeDir, node: Node) -> str:
    path = node_dir.root / "payload_digests.json"
    if not path.is_file():
        return "spec fields changed"
    before = read_json(path)
    now = payload_digests(node)
    parts = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return "changed: " + ", ".join(parts) if parts else "upstream identities changed"


def _resume_note(node_dir: NodeDir) -> str:
    if not node_dir.checkpoints.is_dir():
        return ""
    from trinity.nodes.checkpoints import last_committed_step

    step = last_committed_step(node_dir)
    return f"; will resume from its checkpoint at step {step}" if step is not None else ""


def supersede(run: RunDir, node: Node) -> Path | None:
    """Move a node folder whose identity changed aside (RUN/superseded/...), keeping what it trained."""
    node_dir = run.node(node.id)
    status = NodeStatus.read(node_dir)
    if not node_dir.root.exists() or not status.identity or status.identity == node.identity:
        return None
    return set_aside(run, node.id, status.identity[:12])


def set_aside(run: RunDir, node_id: str, tag: str) -> Path:
    """Move node `node_id`'s folder to RUN/superseded/<node id>@<tag>-<time> (the catalog reads it there)."""
    target = run.superseded(node_id, f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run.node(node_id).root), str(target))
    return target


def mark_pending(run: RunDir, node: Node) -> None:
    """Before a node runs: PENDING with its current identity, attempt count kept."""
    node_dir = run.node(node.id)
    node_dir.root.mkdir(parents=True, exist_ok=True)
    old = NodeStatus.read(node_dir)
    attempts = list_attempts(node_dir)
    NodeStatus(
        state="PENDING",
        identity=node.identity,
        attempt=attempts[-1].attempt if attempts else 0,
        message="",
        progress=old.progress,
    ).write(node_dir)
    atomic_write_json(node_dir.root / "payload_digests.json", payload_digests(node))


def reuse_from_store(run: RunDir, graph: nx.DiGraph, decisions: dict[str, Decision]) -> dict[str, Decision]:
    """Give every node decided "reuse" from the shared store its entry's outputs (before any executor starts:
    local and Slurm alike run nothing for it). A node whose entry can no longer be linked runs instead."""
    out = dict(decisions)
    meta = read_json(run.run_json)
    for node in nodes_in_order(graph):
        decision = decisions[node.id]
        if decision.entry is None:
            continue
        supersede(run, node)
        mark_pending(run, node)
        node_dir = run.node(node.id)
        record = AttemptRecord(attempt=next_attempt(node_dir), executor="store", identity=node.identity)
        try:
            placed = link_entry(Path(decision.entry), node_dir)
        except (OSError, ValueError, KeyError, RunError) as exc:
            out[node.id] = Decision(node.id, "run", f"its store entry {decision.entry} could not be linked ({exc})")
            continue
        record_reuse(node_dir, node.id, str(meta["run_id"]), record, placed, "")
    return out


def publish_held(run: RunDir, graph: nx.DiGraph, decisions: dict[str, Decision]) -> list[str]:
    """Publish to the shared store the nodes this run reuses from its own folder (SUCCEEDED here, before the
    store was set or while it lacked them) whose identity the store does not hold whole: a run directory
    made before `execution.store` was added shares what it already has. Returns what it said; a failure
    is said, never raised."""
    store = run_store(run)
    if store is None:
        return []
    meta = read_json(run.run_json)
    said: list[str] = []
    for node in nodes_in_order(graph):
        decision = decisions[node.id]
        node_dir = run.node(node.id)
        if decision.action != "reuse" or decision.entry is not None or store.find(node.identity).usable:
            continue
        if NodeStatus.read(node_dir).state != "SUCCEEDED":
            continue
        try:
            placed = store.publish(
                node_dir,
                identity=node.identity,
                kind=node.kind,
                node_id=node.id,
                run_root=run.root,
                run_id=str(meta["run_id"]),
            )
        except (OSError, RunError) as exc:
            said.append(f"{node.id}: warning: publishing to the store {store.root} failed ({exc})")
            continue
        if not placed.dropped:
            said.append(f"{node.id}: published to {placed.path}{placed.note}")
    return said


def record_reuse(
    node_dir: NodeDir, node_id: str, run_id: str, record: AttemptRecord, placed: Placed, waited_for: str
) -> str:
    """Write a node reused from the store as SUCCEEDED: the attempt record (reused_from), status.json and a
    `reused` event; returns the status message."""
    message = f"reused from {placed.path}{placed.note}" + (f" (after waiting for {waited_for})" if waited_for else "")
    record.reused_from = str(placed.path)
    record.finish(node_dir, "SUCCEEDED", 0, None, message)
    status = NodeStatus.read(node_dir)
    status.state, status.attempt, status.message = "SUCCEEDED", record.attempt, message
    status.write(node_dir)
    store_event(node_dir, node_id, run_id, record.attempt, "reused", message, entry=str(placed.path))
    return message


def store_event(
    node_dir: NodeDir, node_id: str, run_id: str, attempt: int, kind: str, message: str, **data: str
) -> None:
    """One row of the `events` table (trinity sql) for what the shared store did with this node attempt."""
    from trinity.store.telemetry import TelemetryWriter  # here: it loads pyarrow

    with TelemetryWriter(node_dir, node_id, attempt, run_id, tensorboard=False) as writer:
        writer.log_event(0, kind, message, **data)


class RunLock:
    """One scheduler per run directory: an exclusive flock on RUN/.lock."""

    def __init__(self, run: RunDir) -> None:
        self.path = run.root / ".lock"
        self._file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunError(f"{self.path.parent}: already being run by {holder}; wait for it or stop it first") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), "since": now_iso()}))
        self._file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
