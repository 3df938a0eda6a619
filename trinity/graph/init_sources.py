"""The `init:` of training stages at compile time: the dependency edge, the identity, the checks.

A stage with `init` (trinity.spec.init) drops its default training upstream (the previous phase,
the last pretraining phase, extension or SFT) and starts from the source instead:
- `from: NODE[@STEP]` becomes a dependency edge to that node of the same branch; its identity
  enters through the edge, the step through the payload;
- `run: DIR, node: N, step: S` reads DIR/graph.json: N's identity and the step (S, or the step of
  its final.json) enter the payload;
- `hf: DIR` hashes config.json, every *.safetensors and the index (sha256 of each file's bytes)
  into the payload, so a changed file changes the identity. [open] This reads every byte on each
  compile (about 1 GB/s); a cache keyed by size and mtime would make it free for unchanged files.
RL, which otherwise reaches the tokenizer through SFT, gets the tokenizer as a direct dependency.

Every problem is one located line (exit 2): an unknown or non-training node, a cycle, a step at
which the source commits no checkpoint, a missing run directory, node, committed step or Hugging
Face directory. Run directories are read as JSON here, not through trinity.run (same floor), with
the layout of trinity.run.layout: RUN/graph.json, RUN/nodes/<id>/outputs/final.json,
RUN/nodes/<id>/checkpoints/step-%08d/COMMITTED. The architecture check (the source's parameter
shapes against this model's) needs the model and interop, floors above this one:
trinity.nodes.init_source.check_init_architectures, run by `trinity validate` and `trinity run`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import networkx as nx

from trinity.graph.kinds import TRAINING_KINDS
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.init import InitSpec
from trinity.spec.yaml_source import Located, Path_

HF_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")
"""The files of a Hugging Face directory whose bytes enter the identity."""
_HASH_BLOCK = 1 << 24


class DraftLike(Protocol):
    """What this module reads and changes of a compiler draft (trinity.graph.compile._Draft)."""

    base_id: str
    kind: Any
    payload: dict[str, Any]
    deps: list[str]


@dataclass(frozen=True)
class InitTarget:
    """A training node of the branch whose stage declares `init`, and where the spec says so."""

    base_id: str
    path: Path_
    init: InitSpec


def init_targets(spec: ExperimentSpec) -> list[InitTarget]:
    """The training nodes of `spec` that start from an `init` source."""
    out = [
        InitTarget(f"pretrain/{p.name}", ("data", "phases", i, "init"), p.init)
        for i, p in enumerate(spec.data.phases)
        if p.init is not None
    ]
    for name in ("extend", "sft", "rl"):
        stage = getattr(spec.stages, name)
        if stage is not None and stage.init is not None:
            out.append(InitTarget(name, ("stages", name, "init"), stage.init))
    return out


def init_of(spec: ExperimentSpec, base_id: str) -> InitSpec | None:
    """The `init` of training node `base_id` (None: it starts from its default upstream)."""
    return next((t.init for t in init_targets(spec) if t.base_id == base_id), None)


def checkpoint_every(spec: ExperimentSpec) -> int:
    """The checkpoint cadence (`execution.checkpoint.every`, formerly `execution.checkpoint_every`)."""
    section = getattr(spec.execution, "checkpoint", None)
    every = getattr(section, "every", None) or getattr(spec.execution, "checkpoint_every", None)
    assert isinstance(every, int)
    return every


def step_range(spec: ExperimentSpec, base_id: str) -> tuple[int, int] | None:
    """(first, last) optimizer steps of training node `base_id`: it commits checkpoints at the multiples of
    the cadence in (first, last] and at last. None when it starts from an `init` (first depends on it)."""
    if init_of(spec, base_id) is not None:
        return None
    if base_id.startswith("pretrain/"):
        steps = spec.pretrain_steps()
        i = next(i for i, p in enumerate(spec.data.phases) if f"pretrain/{p.name}" == base_id)
        if any(p.init is not None for p in spec.data.phases[:i]):
            return None
        return sum(steps[:i]), sum(steps[: i + 1])
    stage = getattr(spec.stages, base_id)
    last = stage.steps if base_id == "rl" else stage.optimizer_steps
    return 0, int(last)


def commits_at(step: int, first_last: tuple[int, int] | None, every: int) -> bool:
    """Whether a node with steps (first, last] (None: unknown) commits a checkpoint at `step`."""
    if first_last is None:
        return step % every == 0
    first, last = first_last
    return step == last or (first < step < last and step % every == 0)


def apply_init(drafts: Sequence[DraftLike], spec: ExperimentSpec, source: Located | None, base_dir: Path) -> list[str]:
    """Rewire the branch's drafts that declare `init` (deps and payload); the problems found, located."""
    by_id = {d.base_id: d for d in drafts}
    problems: list[str] = []
    for d in drafts:  # a stage without `init` (or a phase without its own `lr`) keeps the identity it had before
        for section in ("phase", "extend", "sft", "rl"):
            stage = d.payload.get(section)
            if isinstance(stage, dict):
                d.payload[section] = {k: v for k, v in stage.items() if not (k in ("init", "lr") and v is None)}

    def where(path: Path_) -> str:
        loc = source.location_of(path) if source is not None else None
        return str(loc) if loc is not None else "<spec>"

    for target in init_targets(spec):
        draft, init = by_id[target.base_id], target.init
        draft.deps = [d for d in draft.deps if by_id[d].kind not in TRAINING_KINDS]
        if draft.kind == "rl":  # reached the tokenizer through SFT
            draft.deps.append("tokenizer")
        found: dict[str, Any] | str
        if init.from_ is not None:
            found = _from_graph(target, init, spec, by_id)
            if isinstance(found, dict):
                draft.deps.append(str(found["node"]))
        elif init.run is not None:
            found = _from_run(init, base_dir)
        else:
            assert init.hf is not None
            found = _from_hf(init.hf, base_dir)
        if isinstance(found, str):
            field = "from" if init.from_ is not None else "run" if init.run is not None else "hf"
            if init.step is not None and found.startswith("names step"):
                field = "step"
            problems.append(f"{where((*target.path, field))}: {'.'.join(map(str, target.path))}.{field} {found}")
            continue
        draft.payload["init"] = {**found, "optimizer": init.optimizer}
    if not problems:
        problems += _cycles(drafts, spec, where)
    return problems


def _from_graph(target: InitTarget, init: InitSpec, spec: ExperimentSpec, by_id: dict[str, DraftLike]) -> Any:
    node, step = init.from_node, init.from_step if init.from_step is not None else init.step
    assert node is not None
    training = sorted(d.base_id for d in by_id.values() if d.kind in TRAINING_KINDS)
    if node not in by_id:
        return f"names node {node!r}, which this graph does not have (training nodes: {', '.join(training)})"
    if by_id[node].kind not in TRAINING_KINDS:
        return f"names {node!r}, a {by_id[node].kind} node; a stage starts from a training node ({', '.join(training)})"
    if node == target.base_id:
        return f"names {node!r}, the node itself"
    if step is not None:
        every, span = checkpoint_every(spec), step_range(spec, node)
        if not commits_at(step, span, every):
            last = f" or its last step {span[1]}" if span is not None else ""
            first = f" after its first step {span[0]}" if span is not None and span[0] else ""
            return (
                f"names step {step} of {node!r}, which commits no checkpoint there: it commits one every "
                f"execution.checkpoint.every = {every} steps{first}{last}"
            )
    return {"source": "graph", "node": node, "step": step}


def _from_run(init: InitSpec, base_dir: Path) -> dict[str, Any] | str:
    assert init.run is not None and init.node is not None
    run = (base_dir / init.run).resolve()
    try:
        graph = json.loads((run / "graph.json").read_text())
    except FileNotFoundError:
        return f"= {init.run!r}: {run} is not a run directory (no graph.json)"
    except (OSError, ValueError) as exc:
        return f"= {init.run!r}: {run}/graph.json cannot be read ({exc})"
    nodes = {str(n.get("id")): n for n in graph.get("nodes", ()) if isinstance(n, dict)}
    entry = nodes.get(init.node)
    training = sorted(i for i, n in nodes.items() if n.get("kind") in TRAINING_KINDS)
    if entry is None or entry.get("kind") not in TRAINING_KINDS:
        what = (
            "has no node" if entry is None else f"has {init.node!r} as a {entry.get('kind')} node, not a training node"
        )
        return f"= {init.run!r}: the run {what} {init.node!r} (training nodes: {', '.join(training) or 'none'})"
    node_dir = run / "nodes" / init.node
    step = init.step
    if step is None:
        try:
            step = int(json.loads((node_dir / "outputs" / "final.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"= {init.run!r}: node {init.node!r} has no final checkpoint (outputs/final.json); run it first"
    elif not (node_dir / "checkpoints" / f"step-{step:08d}" / "COMMITTED").is_file():
        have = sorted(p.parent.name for p in (node_dir / "checkpoints").glob("step-*/COMMITTED"))
        return (
            f"= {init.run!r}: node {init.node!r} has no committed checkpoint at step {step} "
            f"(committed: {', '.join(have) or 'none'})"
        )
    return {"source": "run", "node": init.node, "identity": str(entry.get("identity")), "step": step}


def hf_files(folder: Path) -> list[Path]:
    """The files of a Hugging Face directory whose bytes make its identity, sorted by name."""
    return sorted({p for pattern in HF_FILES for p in folder.glob(pattern) if p.is_file()}, key=lambda p: p.name)


def _from_hf(hf: str, base_dir: Path) -> dict[str, Any] | str:
    folder = (base_dir / hf).resolve()
    if not (folder / "config.json").is_file():
        return f"= {hf!r}: {folder} is not a Hugging Face model directory (no config.json)"
    files = hf_files(folder)
    if not any(p.name.endswith(".safetensors") for p in files):
        return f"= {hf!r}: {folder} holds no *.safetensors weights"
    digests = {}
    for path in files:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
        digests[path.name] = h.hexdigest()
    return {"source": "hf", "files": digests}


def _cycles(drafts: Sequence[DraftLike], spec: ExperimentSpec, where: Any) -> list[str]:
    graph = nx.DiGraph([(dep, d.base_id) for d in drafts for dep in d.deps])
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return []
    members = [a for a, _ in cycle]
    target = next(t for t in init_targets(spec) if t.base_id in members)
    shown = " -> ".join([*members, members[0]])
    return [f"{where((*target.path, 'from'))}: {'.'.join(map(str, target.path))}.from makes a cycle: {shown}"]
