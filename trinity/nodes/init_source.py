"""Start a training node from its `init:` source (trinity.spec.init) instead of its default upstream.

Where the source is found (the compiler has checked that it exists: trinity.graph.init_sources):
- `from: NODE[@STEP]`: the dependency of this node whose base id is NODE (in a sweep, this branch's);
- `run: DIR, node: N, step: S`: DIR/nodes/N of another run directory (DIR relative to the graph file);
- either at step S (a committed checkpoint) or, without a step, the node's final checkpoint;
- `hf: DIR`: a transformers afmoe directory (trinity.interop.hf.load_pretrained).

What is loaded: the model's state dict (expert bias and SMEBU momentum included; a Hugging Face
model has no momentum, so it starts at 0), into this job's shards (`like=training.template()`, as
`Training.load_upstream` does); with `optimizer: true` the optimizer state too; and for a trinity
source its RNG states, as a phase continuing from the previous one does.

Where counting starts: a pretraining phase continues the source's step and tokens seen (so the
token-based batch schedule, and optim.schedule unless the phase has its own `lr`, go on from
there); a Hugging Face source has none and starts at step 0. Extension, SFT and RL start at step 0
as they always do. Each start is recorded as an `events` row of kind "init": the source, its step,
and the sha256 of the loaded model state dict (`state_digest`), so a reader can check which weights
a node started from.

`check_init_architectures` compares the parameter shapes of the source's model (from its spec, its
run's spec.yaml or its config.json: meta-device state dicts, no weights read) with this graph's; it
lives here rather than in the compiler because it needs the model and the interop floors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import yaml
from torch.distributed.tensor import DTensor, distribute_tensor

from trinity.distributed import step as collective
from trinity.errors import NodeFailure, SpecError
from trinity.graph.init_sources import init_of, init_targets
from trinity.interop.hf import load_pretrained, spec_from_hf_config
from trinity.model import TrinityModel
from trinity.nodes.checkpoints import FINAL
from trinity.nodes.context import NodeContext
from trinity.nodes.seeds import restore_rng_state
from trinity.run.layout import RunDir, read_json
from trinity.spec.init import InitSpec
from trinity.spec.loading import LoadedSpec
from trinity.spec.model import ModelSpec
from trinity.store.checkpoint import load_checkpoint
from trinity.store.checkpoint_commit import checkpoint_name, read_marker
from trinity.store.checkpoint_zarr import read_attrs
from trinity.store.telemetry import TelemetryWriter


@dataclass(frozen=True)
class Source:
    """Where a node's `init` points: a trinity checkpoint folder, or a Hugging Face directory."""

    description: str
    """How the events row and messages name it: `pretrain/stable@2000`, `runs/base:sft@400`, `hf:DIR`."""
    checkpoint: Path | None = None
    hf: Path | None = None


@dataclass(frozen=True)
class Started:
    """What `load_init` loaded: where counting starts and the digest of the model it loaded."""

    step: int
    tokens: int
    digest: str


def stage_init(ctx: NodeContext) -> InitSpec | None:
    """The `init` of this node's stage (None: it starts from its default upstream)."""
    base = ctx.node_id.split("[", 1)[0]
    return init_of(ctx.spec, base)


def find_source(ctx: NodeContext, init: InitSpec) -> Source:
    """The checkpoint folder (or Hugging Face directory) `init` names, as it is on disk now."""
    if init.hf is not None:
        return Source(f"hf:{init.hf}", hf=(ctx.base_dir / init.hf).resolve())
    step = init.from_step if init.from_step is not None else init.step
    if init.from_ is not None:
        node = init.from_node
        dep = next((d for d in ctx.node.deps if d == node or d.startswith(f"{node}[")), None)
        if dep is None:
            raise NodeFailure(f"{ctx.node_id}: init.from names {node!r}, which is not among its dependencies")
        node_dir, shown = ctx.run.node(dep), dep
    else:
        assert init.run is not None and init.node is not None
        node_dir, shown = RunDir((ctx.base_dir / init.run).resolve()).node(init.node), f"{init.run}:{init.node}"
    if step is None:
        final = node_dir.outputs / FINAL
        if not final.is_file():
            raise NodeFailure(f"{ctx.node_id}: init source {shown} has no final checkpoint ({final})")
        record = read_json(final)
        return Source(f"{shown}@{record['step']}", checkpoint=node_dir.inside(str(record["checkpoint"])))
    path = node_dir.checkpoints / checkpoint_name(step)
    read_marker(path)  # a clear error if it was pruned or never committed
    return Source(f"{shown}@{step}", checkpoint=path)


def source_position(source: Source) -> tuple[int, int]:
    """(step, tokens seen) of a trinity checkpoint, read from its skeleton attribute (no arrays); (0, 0) for
    a Hugging Face model."""
    if source.checkpoint is None:
        return 0, 0
    skeleton = read_attrs(source.checkpoint)["skeleton"]
    values = dict(zip(skeleton["k"], skeleton["v"], strict=True))
    return int(values["step"]), int(values["tokens"])


def state_digest(model_sd: dict[str, Any]) -> str:
    """sha256 over the model state dict: for each key in sorted order, the key, dtype, shape and the
    tensor's bytes (a DTensor's full tensor: a collective, so every rank calls this)."""
    h = hashlib.sha256()
    for key in sorted(model_sd):
        value = model_sd[key]
        t = value.full_tensor() if isinstance(value, DTensor) else value
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _like_model(model_sd: dict[str, torch.Tensor], target: dict[str, Any]) -> dict[str, Any]:
    """Full tensors placed like `target`'s (each rank keeps its own piece of the same full tensor)."""
    out: dict[str, Any] = {}
    for key, full in model_sd.items():
        ref = target[key]
        if isinstance(ref, DTensor):
            out[key] = distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
        else:
            out[key] = full.to(device=ref.device, dtype=ref.dtype)
    return out


def load_init(ctx: NodeContext, init: InitSpec, training: Any, template: dict[str, Any] | None) -> Started:
    """Load the source into `training` (trinity.nodes.trainer.Training, or anything with `model` and
    `optimizer`), record the `events` row, and return where counting starts."""
    source = find_source(ctx, init)
    model: TrinityModel = training.model
    if source.hf is not None:
        hf_model, hf_spec = load_pretrained(source.hf)
        problem = architecture_problem(hf_spec, ctx.spec.model)
        if problem is not None:
            raise NodeFailure(f"{ctx.node_id}: init source {source.description}: {problem}")
        model_sd = _like_model(hf_model.state_dict(), model.state_dict())
        model.load_state_dict(model_sd)
    else:
        assert source.checkpoint is not None
        state = load_checkpoint(source.checkpoint, like=template)
        model_sd = state["model"]
        model.load_state_dict(model_sd)
        if init.optimizer:
            training.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
    step, tokens = source_position(source)
    digest = state_digest(model.state_dict())
    if collective.rank() == 0:
        writer = TelemetryWriter(ctx.dir, ctx.node_id, ctx.attempt, ctx.run_id, tensorboard=False)
        try:
            writer.log_event(
                step, "init", f"started from {source.description}", source=source.description,
                source_step=step, model_sha256=digest, optimizer=init.optimizer,
            )  # fmt: skip
        finally:
            writer.close()
        print(f"trinity: {ctx.node_id}: starting from {source.description} (model sha256 {digest[:12]})", flush=True)
    return Started(step, tokens, digest)


# -- the architecture check ---------------------------------------------------------------------


def parameter_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of the model of `spec` and its shape (built on `meta`: no memory)."""
    with torch.device("meta"):
        model = TrinityModel(spec)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def architecture_problem(source: ModelSpec, here: ModelSpec) -> str | None:
    """The first state-dict entry whose shape differs between the source's model and this one, or None."""
    if source == here:
        return None
    theirs, ours = parameter_shapes(source), parameter_shapes(here)
    for key in list(ours) + [k for k in theirs if k not in ours]:
        a, b = theirs.get(key), ours.get(key)
        if a != b:
            shown_a = list(a) if a is not None else "missing"
            shown_b = list(b) if b is not None else "missing"
            return f"the architectures differ: {key}: {shown_a} in the source, {shown_b} here"
    return None


def _run_model_spec(run: Path, node: str) -> ModelSpec:
    graph = json.loads((run / "graph.json").read_text())
    entry = next(n for n in graph["nodes"] if n.get("id") == node)
    data = yaml.safe_load((run / str(entry.get("spec_file", "spec.yaml"))).read_text())
    return ModelSpec.model_validate(data["model"])


def check_init_architectures(loaded: LoadedSpec, graph: nx.DiGraph) -> None:
    """Raise SpecError (exit 2, at the `init` field) for each stage whose source's parameter shapes differ."""
    problems: list[str] = []
    for node_id in graph:
        spec = graph.nodes[node_id]["spec"]
        base = node_id.split("[", 1)[0]
        target = next((t for t in init_targets(spec) if t.base_id == base), None)
        if target is None:
            continue
        init = target.init
        if init.from_ is not None:
            dep = next(d for d in graph.nodes[node_id]["node"].deps if d.split("[", 1)[0] == init.from_node)
            field, source = "from", graph.nodes[dep]["spec"].model
        elif init.run is not None:
            assert init.node is not None
            field, source = "run", _run_model_spec((loaded.base_dir / init.run).resolve(), init.node)
        else:
            assert init.hf is not None
            cfg = json.loads(((loaded.base_dir / init.hf).resolve() / "config.json").read_text())
            try:
                field, source = "hf", spec_from_hf_config(cfg)
            except (ValueError, KeyError) as exc:
                problems.append(_at(loaded, (*target.path, "hf"), f"holds a config.json that is not afmoe's ({exc})"))
                continue
        problem = architecture_problem(source, spec.model)
        if problem is not None:
            problems.append(_at(loaded, (*target.path, field), problem))
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))


def _at(loaded: LoadedSpec, path: tuple[str | int, ...], message: str) -> str:
    where = loaded.source.location_of(path)
    return f"{where or '<spec>'}: {'.'.join(map(str, path))} {message}"
