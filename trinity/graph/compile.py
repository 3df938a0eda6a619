"""Compile an experiment spec into a networkx DAG of typed nodes.

    tokenizer -> prepare/PHASE -> pretrain/PHASE1 -> pretrain/PHASE2 -> ... -> extend -> sft -> rl
                 prepare/PHASE1 -> prepare/PHASE2 -> ... -> prepare/extend (each continues the stream)
                                                       eval/NAME@STAGE hang off the checkpoints they read,
                                                       eval/NAME@STAGE@stepS off intermediate ones (`every`),
                                                       export/NAME@STAGE off the final checkpoints they convert

Each node carries its identity: a hash of the spec fields that change its result plus its
upstream identities (`trinity.graph.identity`). A sweep compiles one branch per grid point;
nodes whose identity is the same in every branch (the tokenizer, prepare nodes) are shared,
the others get in their id the part of the branch label their identity depends on:
`pretrain/phase1[muon.lr=0.002]`, or `tokenizer[seed=1]` in a `seed x muon.lr` sweep (shared by the
branches of seed 1).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from trinity.errors import SpecError
from trinity.graph.during import MAX_DURING_NODES, AfterCheckpoint, during_id, eval_steps
from trinity.graph.identity import identity_payload, node_identity
from trinity.graph.init_sources import apply_init
from trinity.graph.kinds import NODE_KINDS, NodeHeader, NodeKind
from trinity.spec.data import MixSpec
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.loading import LoadedSpec, set_path, validate
from trinity.spec.names import node_id_problem
from trinity.spec.yaml_source import Located


@dataclass(frozen=True)
class Node(NodeHeader):
    """One unit of work in the DAG, with the spec fields that entered its identity."""

    payload: dict[str, Any] = field(default_factory=dict, repr=False)
    after_checkpoint: AfterCheckpoint | None = None
    """An eval of an intermediate checkpoint: it may start once that checkpoint is committed (trinity.graph.during)."""


@dataclass(frozen=True)
class Branch:
    """One point of a sweep (or the whole experiment when there is no sweep)."""

    label: str
    spec: ExperimentSpec
    source: Located | None = field(default=None, compare=False, repr=False)
    """The located data it was validated from (where its errors point)."""
    parts: tuple[str, ...] = field(default=(), compare=False)
    """The label's `key=value` part of each grid key, in grid order (empty when there is no sweep)."""


@dataclass
class _Draft:
    base_id: str
    kind: NodeKind
    payload: dict[str, Any]
    deps: list[str]
    target: str
    identity: str = ""
    after: tuple[str, int] | None = None
    """(training node base id, step): the checkpoint an eval during training reads (AfterCheckpoint)."""


def branches(loaded: LoadedSpec) -> list[Branch]:
    """The experiment's sweep branches, each validated (errors point at the sweep's line)."""
    sweep = loaded.spec.sweep
    if sweep is None:
        return [Branch("", loaded.spec, loaded.source)]
    keys = list(sweep.grid)
    points = list(itertools.product(*(sweep.grid[k] for k in keys)))
    labels = _label_parts(keys, points)
    out: list[Branch] = []
    for values, parts in zip(points, labels, strict=True):
        label = _joined(parts)
        data = copy.deepcopy(loaded.source.data)
        data.pop("sweep", None)
        located = Located(data, dict(loaded.source.locations))
        for key, value in zip(keys, values, strict=True):
            where = loaded.source.location_of(("sweep", "grid", key))
            path = set_path(data, key, value, str(where))
            if where is not None:
                located.locations[path] = where
        try:
            spec = validate(located)
        except SpecError as exc:
            raise SpecError([f"{line} (in sweep branch {label})" for line in exc.lines]) from None
        out.append(Branch(label, spec, located, parts))
    return out


LABEL_PART = re.compile(r"[A-Za-z0-9_.+-]{1,32}")
"""A grid key or value shown as itself in a branch label; anything else is shown as a digest."""
LABEL_MAX = 128
"""A longer label is replaced by the digest of all of it (node ids become folder names)."""


def _canonical(value: Any) -> str:
    """Compact JSON of a grid value (keys sorted); its repr where JSON cannot sort it (mixed key types)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return repr(value)


def _digest(value: Any) -> str:
    return "~" + hashlib.sha256(_canonical(value).encode("utf-8", "surrogatepass")).hexdigest()[:10]


def _labels(keys: list[str], points: list[tuple[Any, ...]]) -> list[str]:
    """The whole label of each grid point (`_label_parts` joined)."""
    return [_joined(parts) for parts in _label_parts(keys, points)]


def _joined(parts: tuple[str, ...]) -> str:
    """A label from its `key=value` parts (the digest of all of it when longer than LABEL_MAX)."""
    label = ",".join(parts)
    return label if len(label) <= LABEL_MAX else _digest(label)


def _label_parts(keys: list[str], points: list[tuple[Any, ...]]) -> list[tuple[str, ...]]:
    """One label per grid point: `key=value,...` with each key's last two parts (`muon.lr=0.002,loader=rsdb`).

    Labels become part of node ids, so of folder names and Mermaid/DOT labels: a key or value
    whose text is not a short run of letters, digits, '_', '.', '+' or '-' (a path, a list, a
    quote, a slash) is shown as `~` and a digest of its JSON instead, so every label is one safe
    path segment. A key whose different values would show the same (two `{kind: rsdb, ...}`
    sections, 1 and '1', 'Text' and 'text' on a case-insensitive file system) shows each value's
    digest after its text, so different points never share a label or a folder.
    """
    exact = []
    for column in zip(*points, strict=True):
        owners: dict[str, set[str]] = {}
        for value in column:
            owners.setdefault(_value_text(value).casefold(), set()).add(_digest(value))
        exact.append(any(len(o) > 1 for o in owners.values()))
    labels = []
    for values in points:
        parts = []
        for key, value, precise in zip(keys, values, exact, strict=True):
            text = _value_text(value)
            if precise and not text.startswith("~"):
                text += _digest(value)
            parts.append(f"{_key_text(key)}={text}")
        labels.append(tuple(parts))
    return labels


def _key_text(key: str) -> str:
    parts = key.split(".")
    text = ".".join(parts[-2:]) if len(parts) > 1 else key
    return text if LABEL_PART.fullmatch(text) else _digest(key)


def _value_text(value: Any) -> str:
    if isinstance(value, dict) and "kind" in value:  # a tagged section: its kind names it ({kind: rsdb} -> rsdb)
        text = str(value["kind"])
    elif isinstance(value, dict | list):
        text = _canonical(value)
    else:
        text = str(value)
    return text if LABEL_PART.fullmatch(text) else _digest(value)


def _mix_sources(spec: ExperimentSpec, mix: MixSpec) -> dict[str, Any]:
    return {name: identity_payload(spec.data.sources[name]) for name in sorted(mix.mix)}


def _prepare_payload(spec: ExperimentSpec, mix: MixSpec) -> dict[str, Any]:
    """Prepare nodes tokenize a mix into a store: loader and sequence length don't matter to them. Each
    continues every source's stream where the previous phase's prepare stopped (its dependency), so its
    identity holds that one's; `stream` marks stores that record where they stopped (older ones did not)."""
    return {
        "tokens": mix.tokens,
        "mix": dict(mix.mix),
        "sources": _mix_sources(spec, mix),
        "holdout_documents": spec.data.holdout_documents,
        "seed": spec.seed,
        "stream": "continued",
    }


def _drafts(spec: ExperimentSpec) -> list[_Draft]:
    """The nodes of one branch, in topological order."""
    tok_sources = spec.tokenizer.sources or tuple(spec.data.sources)
    drafts = [
        _Draft(
            "tokenizer",
            "tokenizer",
            {
                "tokenizer": identity_payload(spec.tokenizer),
                "sources": {n: identity_payload(spec.data.sources[n]) for n in sorted(tok_sources)},
                "seed": spec.seed,
            },
            [],
            "tokenizer",
        )
    ]
    training = {
        "model": identity_payload(spec.model),
        "stability": identity_payload(spec.stability),
        "optim": identity_payload(spec.optim),
        "data_streams": spec.data.streams,  # which stream each micro-batch comes from
        "seed": spec.seed,
        **({"inject": identity_payload(spec.execution.inject)} if spec.execution.inject else {}),  # tests' faults
    }
    horizon = [{"name": p.name, "tokens": p.tokens, "seq_len": p.seq_len} for p in spec.data.phases]
    previous = ""
    previous_prepare: list[str] = []  # the prepare node whose stream positions the next one continues from
    for index, phase in enumerate(spec.data.phases):
        drafts.append(
            _Draft(
                f"prepare/{phase.name}",
                "prepare",
                _prepare_payload(spec, phase),
                ["tokenizer", *previous_prepare],
                phase.name,
            )
        )
        previous_prepare = [f"prepare/{phase.name}"]
        payload = {**training, "phase": identity_payload(phase), "index": index, "horizon": horizon}
        deps = [f"prepare/{phase.name}", *([previous] if previous else [])]
        drafts.append(_Draft(f"pretrain/{phase.name}", "pretrain", payload, deps, phase.name))
        previous = f"pretrain/{phase.name}"
    stage_node = {
        "pretrain": previous,
        **{f"pretrain:{p.name}": f"pretrain/{p.name}" for p in spec.data.phases},
    }
    if (ext := spec.stages.extend) is not None:
        deps = ["tokenizer", *previous_prepare]
        drafts.append(_Draft("prepare/extend", "prepare", _prepare_payload(spec, ext), deps, "extend"))
        payload = {**training, "extend": identity_payload(ext)}
        drafts.append(_Draft("extend", "extend", payload, ["prepare/extend", previous], "extend"))
        previous = stage_node["extend"] = "extend"
    if (sft := spec.stages.sft) is not None:
        payload = {**training, "sft": identity_payload(sft)}
        drafts.append(_Draft("sft", "sft", payload, [previous, "tokenizer"], "sft"))
        previous = stage_node["sft"] = "sft"
    if (rl := spec.stages.rl) is not None:
        payload = {"stability": training["stability"], "rl": identity_payload(rl), "seed": spec.seed}
        drafts.append(_Draft("rl", "rl", payload, [previous], "rl"))
        stage_node["rl"] = "rl"
    for ev in spec.stages.evals:
        for ref in ev.after:
            deps = [stage_node[ref]]
            if ev.kind == "heldout_loss":
                deps += [f"prepare/{p.name}" for p in spec.data.phases]
            # `every` adds nodes (_during_drafts), it does not change what the final checkpoint scores
            payload = {"eval": {k: v for k, v in identity_payload(ev).items() if k not in ("after", "every")}}
            payload["stage"] = ref
            drafts.append(_Draft(f"eval/{ev.name}@{ref}", "eval", payload, deps, ref))
    for ex in spec.stages.exports:  # the stage's final checkpoint, and the tokenizer whose files it ships
        payload = {"export": identity_payload(ex), "model": training["model"], "seed": spec.seed}
        deps = [stage_node[ex.after], "tokenizer"]
        drafts.append(_Draft(f"export/{ex.label}@{ex.after}", "export", payload, deps, ex.after))
    return drafts


def _during_drafts(spec: ExperimentSpec, drafts: list[_Draft], source: Located | None) -> list[str]:
    """Append to `drafts` one node per intermediate checkpoint each eval with `every` scores (trinity.graph.during);
    the problems found, located at the eval's `every`."""
    by_id = {d.base_id: d for d in drafts}
    phases = [f"pretrain/{p.name}" for p in spec.data.phases]
    problems: list[str] = []
    total = 0
    for i, ev in enumerate(spec.stages.evals):
        loc = source.location_of(("stages", "evals", i, "every")) if source is not None else None
        where = f"{loc if loc is not None else '<spec>'}: stages.evals.{i}.every"
        for ref in ev.after:
            nodes = phases if ref == "pretrain" else [f"pretrain/{ref[9:]}"] if ref.startswith("pretrain:") else [ref]
            found = eval_steps(spec, ev, ref, nodes)
            if isinstance(found, str):
                problems.append(f"{where} {found}")
                continue
            total += len(found)
            final = by_id[f"eval/{ev.name}@{ref}"]
            others = [d for d in final.deps if by_id[d].kind == "prepare"]  # what the final eval reads besides
            for base, step in found:
                payload = {**final.payload, "step": step}
                draft = _Draft(
                    during_id(final.base_id, step), "eval", payload, [base, *others], ref, after=(base, step)
                )
                drafts.append(draft)
    if total > MAX_DURING_NODES and not problems:
        loc = source.location_of(("stages", "evals")) if source is not None else None
        problems.append(
            f"{loc if loc is not None else '<spec>'}: stages.evals would evaluate {total} intermediate checkpoints "
            f"(at most {MAX_DURING_NODES} eval nodes in all): evaluate less often (a larger `every`)"
        )
    return problems


def _upstream_first(drafts: list[_Draft]) -> list[_Draft]:
    """The drafts with every one after its deps (an `init.from` may point at a node `_drafts` lists later),
    otherwise in their order."""
    order = {d.base_id: i for i, d in enumerate(drafts)}
    deps = nx.DiGraph([(x, d.base_id) for d in drafts for x in d.deps])
    deps.add_nodes_from(order)
    by_id = {d.base_id: d for d in drafts}
    return [by_id[n] for n in nx.lexicographical_topological_sort(deps, key=order.__getitem__)]


def compile_graph(loaded: LoadedSpec) -> nx.DiGraph:
    """The DAG of the experiment: node attribute `node` holds a `Node`; edges point downstream."""
    per_branch: list[tuple[Branch, list[_Draft]]] = []
    identities_of: dict[str, set[str]] = {}
    problems: list[str] = []
    for branch in branches(loaded):
        drafts = _drafts(branch.spec)
        found = _during_drafts(branch.spec, drafts, branch.source)  # evals of intermediate checkpoints
        found += apply_init(drafts, branch.spec, branch.source, loaded.base_dir)  # `init:` sources rewire deps
        problems += [f"{line} (in sweep branch {branch.label})" if branch.label else line for line in found]
        if found:
            continue
        by_id = {d.base_id: d for d in drafts}
        drafts = _upstream_first(drafts)
        for d in drafts:
            d.identity = node_identity(d.kind, d.payload, [by_id[x].identity for x in d.deps])
            identities_of.setdefault(d.base_id, set()).add(d.identity)
        per_branch.append((branch, drafts))
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))

    axes = _deciding_axes(per_branch)
    _refuse_idle_keys(loaded, axes)
    graph = nx.DiGraph(name=loaded.spec.name)
    for branch, drafts in per_branch:
        labels = {d.base_id: _joined(tuple(branch.parts[k] for k in axes[d.base_id])) for d in drafts}
        final = {d.base_id: f"{d.base_id}[{labels[d.base_id]}]" if labels[d.base_id] else d.base_id for d in drafts}
        for d in drafts:
            node_id = final[d.base_id]
            if node_id in graph:
                continue
            node = Node(
                id=node_id,
                kind=d.kind,
                identity=d.identity,
                deps=tuple(final[x] for x in d.deps),
                payload=d.payload,
                target=d.target,
                branch=labels[d.base_id],
                after_checkpoint=None if d.after is None else AfterCheckpoint(final[d.after[0]], d.after[1]),
            )
            # `branch_label`: the (first) whole branch whose spec the node runs with.
            graph.add_node(node_id, node=node, spec=branch.spec, branch_label=branch.label)
            for dep in node.deps:
                graph.add_edge(dep, node_id)
    assert nx.is_directed_acyclic_graph(graph)
    # Names are `Name`s and labels are made safe, so every id is a relative path under RUN/nodes.
    assert all(node_id_problem(n) is None for n in graph), [(n, node_id_problem(n)) for n in graph]
    return graph


def _deciding_axes(per_branch: list[tuple[Branch, list[_Draft]]]) -> dict[str, tuple[int, ...]]:
    """Per node base id, the grid keys (indices) its identity depends on: its id's label shows only those.

    A node the same in every branch depends on none (it is shared by all); one that differs with the
    seed but not with the loader of a `seed x loader` sweep gets `[seed=0]` and is shared by the
    branches of one seed. Keys are dropped one at a time while the identity stays a function of the
    remaining keys' values, so branches with equal labels always hold the same node.
    """
    if not per_branch or not per_branch[0][0].parts:
        return {d.base_id: () for _, drafts in per_branch for d in drafts}
    n_axes = len(per_branch[0][0].parts)
    identity_of: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for branch, drafts in per_branch:
        for d in drafts:
            identity_of.setdefault(d.base_id, []).append((branch.parts, d.identity))
    axes: dict[str, tuple[int, ...]] = {}
    for base_id, rows in identity_of.items():
        kept = list(range(n_axes))
        for k in range(n_axes):
            trial = [a for a in kept if a != k]
            seen: dict[tuple[str, ...], str] = {}
            if all(seen.setdefault(tuple(parts[a] for a in trial), ident) == ident for parts, ident in rows):
                kept = trial
        axes[base_id] = tuple(kept)
    return axes


def _refuse_idle_keys(loaded: LoadedSpec, axes: dict[str, tuple[int, ...]]) -> None:
    """A grid key no node's identity depends on is an error: its branches would all be the same nodes.

    Such keys are the fields that never change a result (`execution.*`, `parallel.*`, `name`,
    `description`): the sweep would silently collapse to fewer branches than the grid promises. Repeated
    values of a key are allowed (identical points share their nodes). Comparing execution settings is a
    question of separate runs, not of branches.
    """
    sweep = loaded.spec.sweep
    if sweep is None or len(sweep.grid) == 0:
        return
    used = {k for kept in axes.values() for k in kept}
    problems = []
    for index, key in enumerate(sweep.grid):
        values = sweep.grid[key]
        if index in used or len({_canonical(v) for v in values}) < 2:
            continue  # repeated values are identical points: they share their nodes by design
        where = loaded.source.location_of(("sweep", "grid", key))
        at = f"{where}: " if where is not None else ""
        problems.append(
            f"{at}sweep.grid.{key}: its {len(values)} values give the same nodes in every branch (no node's identity "
            "depends on this field: execution.*, parallel.*, name and description never change a result), so "
            "the sweep would collapse to fewer branches than the grid has; remove it from the "
            "grid, or compare the settings as separate runs "
            "(`trinity run GRAPH --run-dir DIR --set FIELD=VALUE`, one run directory per value)"
        )
    if problems:
        raise SpecError(problems)


def nodes_in_order(graph: nx.DiGraph) -> list[Node]:
    """Nodes in a deterministic topological order."""
    return [graph.nodes[n]["node"] for n in nx.lexicographical_topological_sort(graph, key=_order_key(graph))]


def _order_key(graph: nx.DiGraph) -> Any:
    def key(node_id: str) -> tuple[int, str]:
        return (NODE_KINDS.index(graph.nodes[node_id]["node"].kind), node_id)

    return key
