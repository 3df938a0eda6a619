"""Evaluation nodes `eval/NAME@STAGE`: score the final checkpoint of a stage (PAPER.md 6-7).

The node's first dependency is the training node whose final checkpoint it reads; NAME selects the
eval in `stages.evals`. An eval with `every` also has nodes `eval/NAME@STAGE@stepS` (trinity.graph.during)
that score the committed checkpoint at step S of their training node (`after_checkpoint`), usually while
that node still trains; the same code scores it, only the checkpoint differs. The kinds:
- heldout_loss: loss per source on the held-out documents of every pretraining phase's prepare node
  (a source held out in several phases is scored once: the first phase's documents), plus "all";
- mk_niah: accuracy and choice accuracy at each of `lengths` (`trinity.evals.niah`);
- arithmetic: greedy exact-match accuracy on held-out generated problems (`trinity.evals.arithmetic`).

Each result is one row of the telemetry `evals` table (node, attempt, step = the checkpoint's step,
task, metric, length, score, n, extra: stage, stage_node, checkpoint, ...) and the whole set is written to
outputs/results.json, which verification checks. Evals are short and deterministic: a re-run attempt starts
over. Rows of every checkpoint of a stage join its loss curve on `step` (docs/guide.md).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from trinity.data.store import open_store
from trinity.distributed.device import training_device
from trinity.errors import NodeFailure
from trinity.evals.arithmetic import evaluate_arithmetic, heldout_problems, trained_prompts
from trinity.evals.heldout import heldout_loss
from trinity.evals.niah import evaluate_niah
from trinity.graph.during import AfterCheckpoint
from trinity.model import TrinityModel
from trinity.nodes.context import NodeContext, set_threads
from trinity.nodes.prepare import store_paths
from trinity.nodes.upstream import load_final_model, upstream_tokenizer
from trinity.run.layout import atomic_write_json, read_json
from trinity.spec.stages import ArithmeticEval, Eval, HeldoutLossEval, NiahEval
from trinity.store.checkpoint import load_checkpoint
from trinity.store.checkpoint_commit import list_checkpoints
from trinity.store.telemetry import TelemetryWriter

RESULTS = "results.json"


def eval_spec(ctx: NodeContext) -> Eval:
    name = ctx.node_id.split("/", 1)[1].split("@", 1)[0]  # a name never holds '@' (nor '[')
    for ev in ctx.spec.stages.evals:
        if ev.name == name:
            return ev
    raise NodeFailure(f"stages.evals has no eval named {name!r}")


def heldout_documents(ctx: NodeContext) -> dict[str, list[np.ndarray]]:
    """Held-out documents per source, from the prepare nodes this eval depends on (first phase wins)."""
    docs: dict[str, list[np.ndarray]] = {}
    for dep in ctx.node.deps:
        if ctx.graph[dep].kind != "prepare":
            continue
        store = open_store(store_paths(ctx.run.node(dep).outputs / "store")[1])
        found: dict[str, list[np.ndarray]] = {}
        for i in range(store.n_docs):
            found.setdefault(store.sources[int(store.doc_source[i])], []).append(store.document(i))
        for source, documents in found.items():
            docs.setdefault(source, documents)
    return docs


def checkpoint_model(ctx: NodeContext, after: AfterCheckpoint) -> tuple[TrinityModel, dict[str, Any]]:
    """The model of the committed checkpoint `after.step` of training node `after.node` (eval mode), and where
    it lies (`checkpoint`, relative to that node's folder, and `step`), as `load_final_model` gives a final one."""
    stage_dir = ctx.run.node(after.node)
    committed = {c.step: c.path for c in list_checkpoints(stage_dir.checkpoints) if c.committed}
    if after.step not in committed:
        listed = ", ".join(map(str, committed)) or "none"
        raise NodeFailure(
            f"{after.node} has no committed checkpoint at step {after.step} (committed: {listed}); it keeps one "
            "until its eval succeeds, so it was never written (the node has not reached it) or was removed by "
            "hand: run the training node again (`trinity run GRAPH --nodes ...`) or drop `every` from the eval"
        )
    state = load_checkpoint(committed[after.step])
    if state.get("identity") != ctx.graph[after.node].identity:
        raise NodeFailure(
            f"{committed[after.step]} belongs to another identity of {after.node} than this run's; "
            "run the training node again to write its own"
        )
    model = TrinityModel(ctx.spec.model)
    model.load_state_dict(state["model"])
    model.eval()
    return model, {"checkpoint": str(committed[after.step].relative_to(stage_dir.root)), "step": after.step}


def run_eval_node(ctx: NodeContext) -> dict[str, Any]:
    spec = ctx.spec
    set_threads(ctx)
    ev = eval_spec(ctx)
    after = ctx.node.after_checkpoint
    stage_node = ctx.node.deps[0] if after is None else after.node
    if after is None:
        model, final = load_final_model(ctx.run.node(stage_node), spec.model)
    else:
        model, final = checkpoint_model(ctx, after)
    model = model.to(training_device())  # inputs follow the model (trinity.evals take its device)
    step = int(final["step"])
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    if isinstance(ev, HeldoutLossEval):
        per_source = heldout_loss(model, heldout_documents(ctx), ev.seq_len)
        tokens = sum(r["tokens"] for r in per_source.values())
        overall = sum(r["loss"] * r["tokens"] for r in per_source.values()) / max(tokens, 1)
        for source, r in [*per_source.items(), ("all", {"loss": overall, "tokens": tokens})]:
            rows.append(
                {
                    "task": f"heldout_loss/{source}",
                    "metric": "loss",
                    "length": ev.seq_len,
                    "score": r["loss"],
                    "n": r["tokens"],
                }
            )
    elif isinstance(ev, NiahEval):
        tok = upstream_tokenizer(ctx)
        for length in ev.lengths:
            r = evaluate_niah(model, tok, length, ev.n_keys, ev.samples, seed=spec.seed, pad_id=tok.pad_id)
            rows.append(
                {
                    "task": "mk_niah",
                    "metric": "accuracy",
                    "length": length,
                    "score": r["accuracy"],
                    "n": r["n"],
                    "extra": {"n_keys": ev.n_keys, "examples": r["examples"]},
                }
            )
            rows.append(
                {
                    "task": "mk_niah",
                    "metric": "choice_accuracy",
                    "length": length,
                    "score": r["choice_accuracy"],
                    "n": r["n"],
                    "extra": {"n_keys": ev.n_keys, "chance": 1 / ev.n_keys},
                }
            )
    elif isinstance(ev, ArithmeticEval):
        tok = upstream_tokenizer(ctx)
        problems = heldout_problems(spec.seed, ev.problems, trained_prompts(spec))
        fmt = spec.stages.rl.format_reward if spec.stages.rl is not None else 0.1
        r = evaluate_arithmetic(model, tok, problems, format_reward=fmt)
        extra = {"examples": r["examples"], "format_rate": r["format_rate"], "reward": r["reward"]}
        rows.append({"task": "arithmetic", "metric": "accuracy", "score": r["accuracy"], "n": r["n"], "extra": extra})
        rows.append({"task": "arithmetic", "metric": "reward", "score": r["reward"], "n": r["n"]})
        rows.append({"task": "arithmetic", "metric": "response_length", "score": r["response_length"], "n": r["n"]})
    else:  # pragma: no cover - the spec's union is exhaustive
        raise NodeFailure(f"unknown eval kind {ev.kind!r}")

    with TelemetryWriter(ctx.dir, ctx.node_id, ctx.attempt, ctx.run_id, tensorboard=False) as telemetry:
        for row in rows:
            telemetry.log_eval(
                step,
                row["task"],
                row["score"],
                length=row.get("length"),
                n=row.get("n"),
                metric=row["metric"],
                extra={
                    "stage": ctx.node.target,
                    "stage_node": stage_node,
                    "checkpoint": final["checkpoint"],
                    **row.get("extra", {}),
                },
            )
    results = {
        "eval": ev.name,
        "kind": ev.kind,
        "stage": ctx.node.target,
        "stage_node": stage_node,
        "checkpoint": final["checkpoint"],
        "step": step,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    atomic_write_json(ctx.dir.outputs / RESULTS, results)
    return results


def verify_eval_node(ctx: NodeContext) -> None:
    path = ctx.dir.outputs / RESULTS
    if not path.is_file():
        raise NodeFailure(f"{path} was not written")
    results = read_json(path)
    if not results.get("rows"):
        raise NodeFailure(f"{path} holds no results")
    if not all(np.isfinite(float(r["score"])) for r in results["rows"]):
        raise NodeFailure(f"{path} holds a non-finite score")
