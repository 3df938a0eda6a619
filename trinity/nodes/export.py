"""Export nodes `export/NAME@STAGE` and `trinity export`: a stage's checkpoint as a transformers directory.

The node's first dependency is the training node whose final checkpoint it converts, its second the
tokenizer whose files it ships; NAME selects the export in `stages.exports`. It writes

    outputs/hf/          config.json, safetensors shard(s) [+ index], tokenizer files, generation_config.json
    outputs/export.json  what was exported (stage node, checkpoint, step, identity) and the round-trip check

through `trinity.interop.hf.export_pretrained`, which renames outputs/hf into place only once
`AfmoeForCausalLM.from_pretrained` has loaded it and its logits match trinity's within `check_atol`.
An export is short and deterministic: a re-run attempt starts over.

`export_cli` is the same export, ad hoc, from any committed checkpoint of any training node of a run
(`trinity export RUN_DIR NODE [--step S] OUT_DIR`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from trinity.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from trinity.errors import NodeFailure
from trinity.graph.kinds import CHAT_KINDS, TRAINING_KINDS
from trinity.interop.hf import DEFAULT_SHARD_BYTES, ExportDtype, export_pretrained
from trinity.model import TrinityModel
from trinity.nodes.checkpoints import FINAL
from trinity.nodes.context import NodeContext, set_threads
from trinity.run.graph import RunGraph
from trinity.run.layout import NodeDir, RunDir, atomic_write_json, read_json
from trinity.spec.model import ModelSpec
from trinity.spec.stages import ExportSpec
from trinity.store.checkpoint import load_checkpoint
from trinity.store.checkpoint_commit import list_checkpoints

HF_DIR = "hf"
RESULT = "export.json"


def export_spec(ctx: NodeContext) -> ExportSpec:
    label = ctx.node_id.split("/", 1)[1].rsplit("@", 1)[0]
    for ex in ctx.spec.stages.exports:
        if ex.label == label and ex.after == ctx.node.target:
            return ex
    raise NodeFailure(f"stages.exports has no export named {label!r} after {ctx.node.target!r}")


def _model_of(state: dict[str, Any], spec: ModelSpec) -> TrinityModel:
    model = TrinityModel(spec)
    model.load_state_dict(state["model"])
    return model.eval()


def run_export_node(ctx: NodeContext) -> dict[str, Any]:
    set_threads(ctx)
    ex = export_spec(ctx)
    stage_id = ctx.node.deps[0]
    stage_dir = ctx.run.node(stage_id)
    final_path = stage_dir.outputs / FINAL
    if not final_path.is_file():
        raise NodeFailure(f"{stage_dir.root} has no final checkpoint; run {stage_id} first")
    final = read_json(final_path)
    state = load_checkpoint(stage_dir.inside(str(final["checkpoint"])))
    model = _model_of(state, ctx.spec.model)  # on the CPU: the check compares float32 logits
    tok = load_tokenizer(ctx.upstream_dir("tokenizer").outputs / TOKENIZER_FILE)
    out = ctx.dir.outputs / HF_DIR
    shutil.rmtree(out, ignore_errors=True)  # a previous attempt's export: start over
    (ctx.dir.outputs / RESULT).unlink(missing_ok=True)
    t0 = time.perf_counter()
    result = export_pretrained(
        model,
        tok,
        out,
        chat=ctx.graph[stage_id].kind in CHAT_KINDS,
        dtype=ex.dtype,
        shard_bytes=ex.shard_bytes,
        sequences=ex.check_sequences,
        atol=ex.check_atol,
        seed=ctx.spec.seed,
        extra={
            "stage": ctx.node.target,
            "stage_node": stage_id,
            "checkpoint": final["checkpoint"],
            "step": int(final["step"]),
            "identity": state.get("identity"),
        },
    )
    result["seconds"] = time.perf_counter() - t0
    atomic_write_json(ctx.dir.outputs / RESULT, result)
    return result


def verify_export_node(ctx: NodeContext) -> None:
    """SUCCEEDED only if export.json records a passed check and every file it lists is in outputs/hf."""
    path = ctx.dir.outputs / RESULT
    if not path.is_file():
        raise NodeFailure(f"{path} was not written")
    result = read_json(path)
    check = result["check"]
    if not float(check["max_abs_diff"]) <= float(check["atol"]):
        raise NodeFailure(f"{path}: the round-trip check did not pass ({check['max_abs_diff']} > {check['atol']})")
    missing = [f for f in result["files"] if not (ctx.dir.outputs / HF_DIR / f).is_file()]
    if missing or "config.json" not in result["files"]:
        raise NodeFailure(f"{ctx.dir.outputs / HF_DIR} lacks {', '.join(missing) or 'config.json'}")


def committed_steps(node_dir: NodeDir) -> dict[int, Path]:
    """step -> folder of each committed checkpoint of a node, oldest first."""
    return {c.step: c.path for c in list_checkpoints(node_dir.checkpoints) if c.committed}


def _checkpoint_of(node_id: str, node_dir: NodeDir, step: int | None) -> tuple[Path, int]:
    """The checkpoint `trinity export` reads: `step`'s, else the final one, else the newest committed one."""
    steps = committed_steps(node_dir)
    listed = ", ".join(str(s) for s in steps) or "none"
    if step is not None:
        if step not in steps:
            raise NodeFailure(f"{node_id} has no committed checkpoint at step {step} (committed steps: {listed})")
        return steps[step], step
    if (node_dir.outputs / FINAL).is_file():
        final = read_json(node_dir.outputs / FINAL)
        return node_dir.inside(str(final["checkpoint"])), int(final["step"])
    if not steps:
        raise NodeFailure(f"{node_id} has no committed checkpoint yet; run it first (trinity run or resume)")
    newest = max(steps)
    return steps[newest], newest


def export_cli(
    run_dir: Path,
    node_id: str,
    out_dir: Path,
    step: int | None = None,
    dtype: ExportDtype = "float32",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Export a training node's checkpoint of a run to `out_dir` (absent or empty), checked like the node's.

    Raises NodeFailure with what to do next when the run or node is unknown, the node is not a
    training node, the step is not committed, `out_dir` holds files, or the round trip fails.
    """
    run = RunDir(Path(run_dir).resolve())
    if not run.exists():
        raise NodeFailure(f"{run_dir} is not a run directory (no graph.json)")
    graph = RunGraph.load(run)
    training = ", ".join(n for n, e in graph.nodes.items() if e.kind in TRAINING_KINDS) or "none"
    if node_id not in graph:
        raise NodeFailure(f"{node_id!r} is not a node of this run (training nodes: {training})")
    node = graph[node_id]
    if node.kind not in TRAINING_KINDS:
        raise NodeFailure(f"{node_id} is a {node.kind} node; export a training node ({training})")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NodeFailure(f"{out_dir} exists and is not an empty folder; give a new or empty OUT_DIR")
    node_dir = run.node(node_id)
    checkpoint, at_step = _checkpoint_of(node_id, node_dir, step)
    spec = graph.spec(node)
    tokenizers = graph.upstream(node_id, "tokenizer")
    if not tokenizers:
        raise NodeFailure(f"{node_id} has no upstream tokenizer node")
    tok = load_tokenizer(run.node(tokenizers[0].id).outputs / TOKENIZER_FILE)
    state = load_checkpoint(checkpoint)
    return export_pretrained(
        _model_of(state, spec.model),
        tok,
        out,
        chat=node.kind in CHAT_KINDS,
        dtype=dtype,
        shard_bytes=shard_bytes,
        seed=spec.seed,
        extra={
            "run": str(run.root),
            "node": node_id,
            "checkpoint": str(checkpoint.relative_to(node_dir.root)),
            "step": at_step,
            "identity": state.get("identity"),
        },
    )
