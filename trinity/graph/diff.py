"""What changed between two experiment specs, and which nodes it invalidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from trinity.graph.compile import compile_graph, nodes_in_order
from trinity.spec.base import is_execution_only
from trinity.spec.loading import LoadedSpec

NEVER_IN_IDENTITY = ("name", "description", "parallel")
"""Top-level fields no node identity holds (trinity.graph.compile builds the payloads without them) though
they are not execution-only: the experiment's name and description, and the GPU layout (more GPUs re-run
nothing). A change to them re-runs nothing, and `diff` says so."""


@dataclass(frozen=True)
class FieldChange:
    path: str
    before: Any
    after: Any
    execution_only: bool
    identity: bool = True
    """Whether the field can enter a node's identity (a change to it may re-run nodes)."""


@dataclass(frozen=True)
class SpecDiff:
    changes: list[FieldChange]
    rerun: list[str]
    """Nodes of B whose identity differs from the node of the same id in A, or that A lacks."""
    removed: list[str]
    """Nodes of A that B no longer has."""
    reused: list[str]
    """Nodes of B whose identity A already had."""

    def to_json(self) -> dict[str, Any]:
        return {
            "changes": [c.__dict__ for c in self.changes],
            "rerun": self.rerun,
            "removed": self.removed,
            "reused": self.reused,
        }


def flatten(model: BaseModel, prefix: str = "", execution: bool = False) -> dict[str, tuple[Any, bool]]:
    """Dotted path -> (JSON value, whether it is execution-only) for every leaf field."""
    out: dict[str, tuple[Any, bool]] = {}
    for name, info in type(model).model_fields.items():
        key = f"{prefix}{info.alias or name}"
        value = getattr(model, name)
        exec_only = execution or is_execution_only(type(model), name)
        if isinstance(value, BaseModel):
            out.update(flatten(value, key + ".", exec_only))
        elif isinstance(value, tuple) and value and all(isinstance(v, BaseModel) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{key}.{i}.", exec_only))
        else:
            dumped = model.model_dump(mode="json", by_alias=True, include={name})
            out[key] = (next(iter(dumped.values())), exec_only)
    return out


def diff_specs(a: LoadedSpec, b: LoadedSpec) -> SpecDiff:
    fa, fb = flatten(a.spec), flatten(b.spec)
    changes = []
    for path in sorted(set(fa) | set(fb)):
        before, after = fa.get(path, (None, False))[0], fb.get(path, (None, False))[0]
        if before == after:
            continue
        execution = (fb.get(path) or fa.get(path) or (None, False))[1]
        injected = path.startswith("execution.inject")  # tests' faults: execution-only, yet in the identity
        identity = (injected or not execution) and path.split(".", 1)[0] not in NEVER_IN_IDENTITY
        changes.append(FieldChange(path, before, after, execution, identity))
    ga, gb = compile_graph(a), compile_graph(b)
    known = {ga.nodes[n]["node"].identity for n in ga.nodes}
    rerun = [n.id for n in nodes_in_order(gb) if n.identity not in known]
    reused = [n.id for n in nodes_in_order(gb) if n.identity in known]
    removed = [n for n in ga.nodes if n not in gb.nodes]
    return SpecDiff(changes, rerun, sorted(removed), reused)
