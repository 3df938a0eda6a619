"""Evals during training: which intermediate checkpoints of a training node an eval with `every` scores.

An eval `eval/NAME@STAGE` always scores STAGE's final checkpoint. With `every: N` (or `every: checkpoint`,
N = execution.checkpoint.every) it also gets one node per intermediate checkpoint step S of STAGE:

    eval/NAME@STAGE@stepS      payload = the final eval's + {"step": S}; deps = the final eval's

for every multiple S of N that a training node of STAGE commits (global optimizer steps: phases continue
one another's numbering, `trinity.graph.init_sources.step_range`), except STAGE's last step (that one is
the final checkpoint, the final eval's). 'pretrain' spans every phase node (S belongs to the phase whose
steps (first, last] hold it); 'pretrain:PHASE', 'extend', 'sft' and 'rl' are one node each.

The node is not nested under the final eval's folder (`eval/NAME@STAGE/...` would move with it when it is
superseded), and `@` never occurs in a name, so the id splits back into NAME, STAGE and S. Its identity
holds S and its training node's identity: evaluating a checkpoint twice is the same node, reused.

Such a node reads a checkpoint of a node that may still be running: `AfterCheckpoint` says which, and the
executors start it once that checkpoint is committed (`trinity.execute.during`), not when the training
node has finished. A stage that starts from `init` is refused: its step numbers depend on the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trinity.graph.init_sources import checkpoint_every, step_range
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.stages import Eval

MAX_DURING_NODES = 10_000
"""Most intermediate-checkpoint eval nodes one graph branch may have (a plan, a graph.json and a scheduler
loop stay small); more is a spec error that says to raise `every`."""
STEP_MARK = "@step"
"""What separates a final eval's id from the step of an intermediate one: `eval/heldout@pretrain@step200`."""


@dataclass(frozen=True)
class AfterCheckpoint:
    """A node that may start once training node `node` has COMMITTED its checkpoint at `step` (or SUCCEEDED),
    not only once it SUCCEEDED (graph.json: `"after_checkpoint": {"node": ..., "step": ...}`)."""

    node: str
    step: int

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "step": self.step}

    @classmethod
    def from_json(cls, data: object) -> AfterCheckpoint | None:
        """None for a node without one (and for graph.json files written before this field existed)."""
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("node"), str) or not isinstance(data.get("step"), int):
            raise ValueError(f"after_checkpoint must be {{node: ID, step: INT}}, got {data!r}")
        return cls(str(data["node"]), int(data["step"]))


def during_id(final_eval_id: str, step: int) -> str:
    """Node id of the eval of checkpoint `step`: the final eval's base id + `@stepS`."""
    return f"{final_eval_id}{STEP_MARK}{step}"


def eval_every(spec: ExperimentSpec, ev: Eval) -> int | None:
    """The cadence of `ev` in optimizer steps (None: final checkpoints only)."""
    if ev.every is None:
        return None
    return checkpoint_every(spec) if ev.every == "checkpoint" else int(ev.every)


def eval_steps(spec: ExperimentSpec, ev: Eval, ref: str, nodes: list[str]) -> list[tuple[str, int]] | str:
    """(training node base id, step S) of each intermediate checkpoint `ev` scores for stage reference `ref`,
    whose training nodes are `nodes` (in order; the last one ends the stage); or a message saying why the
    steps cannot be known at compile time."""
    every = eval_every(spec, ev)
    if every is None:
        return []
    spans: list[tuple[str, range]] = []
    for i, base in enumerate(nodes):
        first_last = step_range(spec, base)
        if first_last is None:
            return (
                f"cannot evaluate the intermediate checkpoints of {base}: it starts from `init` (or follows a "
                "phase that does), so its step numbers depend on that source; remove `every` from this eval"
            )
        first, last = first_last
        end = last if i < len(nodes) - 1 else last - 1  # the stage's last step is the final eval's
        spans.append((base, range((first // every + 1) * every, end + 1, every)))
    count = sum(len(steps) for _, steps in spans)  # counted before listing: `every: 1` of 10**9 steps is refused
    if count > MAX_DURING_NODES:
        return (
            f"= {ev.every} would evaluate {count} intermediate checkpoints of {ref} (at most {MAX_DURING_NODES} "
            "eval nodes): evaluate less often (a larger `every`)"
        )
    return [(base, s) for base, steps in spans for s in steps]
