"""The compiled graph as a run directory holds it (graph.json), read back typed.

`trinity.graph.compile` builds the DAG from a spec; `execute.run.write_run` writes it to
graph.json with what a node needs at run time (its branch's spec file, its flattened spec, the
digests of its identity payload). Everything that runs or inspects a run reads it through
`RunGraph`: node entries are `GraphNode`s, never raw dicts, and graph questions (what is
upstream of what) are networkx's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import yaml

from trinity.errors import RunError
from trinity.graph.during import AfterCheckpoint
from trinity.graph.kinds import NODE_KINDS, NodeHeader
from trinity.run.layout import NodeDir, RunDir, read_json
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.names import node_id_problem


@dataclass(frozen=True)
class GraphNode(NodeHeader):
    """One node's entry in graph.json: its header and what it needs at run time."""

    spec_file: str = "spec.yaml"
    """The (branch) spec it runs with, relative to the run directory."""
    flat_spec: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Its spec flattened to dotted paths (the telemetry catalog's `spec` columns)."""
    payload_digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    """A short digest of each top-level part of its identity payload (`explain` names what changed)."""
    after_checkpoint: AfterCheckpoint | None = None
    """An eval of an intermediate checkpoint: it may start once that checkpoint is committed (trinity.graph.during);
    absent from graph.json for every other node (and from files written before it existed)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GraphNode:
        kind = data["kind"]
        if kind not in NODE_KINDS:
            raise RunError(f"node {data.get('id')!r} has unknown kind {kind!r} (known: {NODE_KINDS})")
        for node_id in (data["id"], *data.get("deps", ())):
            problem = node_id_problem(node_id) if isinstance(node_id, str) else "is not a string"
            if problem is not None:
                raise RunError(f"node id {node_id!r} {problem}; it cannot name a folder under nodes/")
        return cls(
            id=str(data["id"]),
            kind=kind,
            identity=str(data["identity"]),
            deps=tuple(data.get("deps", ())),
            target=str(data.get("target", "")),
            branch=str(data.get("branch", "")),
            spec_file=str(data.get("spec_file", "spec.yaml")),
            flat_spec=dict(data.get("flat_spec", {})),
            payload_digests=dict(data.get("payload_digests", {})),
            after_checkpoint=AfterCheckpoint.from_json(data.get("after_checkpoint")),
        )

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.after_checkpoint is None else {"after_checkpoint": self.after_checkpoint.to_json()}
        return {
            **super().to_json(),
            "spec_file": self.spec_file,
            "flat_spec": self.flat_spec,
            "payload_digests": self.payload_digests,
            **extra,
        }


@dataclass(frozen=True)
class RunGraph:
    """graph.json: the run's name and its nodes by id (in the order they were compiled)."""

    run: RunDir
    name: str
    nodes: dict[str, GraphNode]
    digraph: nx.DiGraph = field(repr=False, compare=False)
    """Edges dependency -> dependant; node attribute `node` holds the GraphNode."""

    @classmethod
    def load(cls, run: RunDir) -> RunGraph:
        if not run.exists():
            raise RunError(
                f"{run.root}: not a trinity run directory (no graph.json); start one with `trinity run GRAPH`"
            )
        try:
            data = read_json(run.graph_json)
            nodes = {n.id: n for n in (GraphNode.from_json(entry) for entry in data["nodes"])}
        except RunError as exc:
            raise RunError(f"{run.graph_json}: {exc}; refusing to use this run directory") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise RunError(
                f"{run.graph_json}: damaged ({type(exc).__name__}: {exc}); "
                "write it again with `trinity run GRAPH --run-dir RUN`"
            ) from exc
        for node in nodes.values():
            missing = [dep for dep in node.deps if dep not in nodes]
            if missing:
                raise RunError(f"{run.graph_json}: node {node.id!r} depends on {missing}, which it does not list")
        digraph = nx.DiGraph()
        for node in nodes.values():
            digraph.add_node(node.id, node=node)
            digraph.add_edges_from((dep, node.id) for dep in node.deps)
        return cls(run, str(data.get("name", "")), nodes, digraph)

    def __getitem__(self, node_id: str) -> GraphNode:
        return self.nodes[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def dep(self, node_id: str, kind: str, target: str | None = None) -> GraphNode | None:
        """The direct dependency of `node_id` of `kind` (and `target`), if any."""
        for dep in self.nodes[node_id].deps:
            entry = self.nodes[dep]
            if entry.kind == kind and (target is None or entry.target == target):
                return entry
        return None

    def upstream(self, node_id: str, kind: str) -> list[GraphNode]:
        """The nodes of `kind` that `node_id` depends on, directly or not: nearest first, then by id."""
        reversed_view = self.digraph.reverse(copy=False)
        distance: dict[str, int] = nx.single_source_shortest_path_length(reversed_view, node_id)
        found = [n for n in distance if n != node_id and self.nodes[n].kind == kind]
        return [self.nodes[n] for n in sorted(found, key=lambda n: (distance[n], n))]

    def spec(self, node: GraphNode) -> ExperimentSpec:
        """The (branch) spec a node runs with, as resolved when the run was written."""
        data = yaml.safe_load(self.run.inside(node.spec_file).read_text())
        data.pop("sweep", None)
        return ExperimentSpec.model_validate(data)

    def node_dir(self, node: GraphNode | str) -> NodeDir:
        return self.run.node(node if isinstance(node, str) else node.id)
