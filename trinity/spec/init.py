"""`init:` of a training stage: start it from a checkpoint instead of its default upstream.

Any training stage (each `data.phases` entry, `stages.extend`, `stages.sft`, `stages.rl`) may declare
exactly one source:

    init: {from: pretrain/stable@2000}              a training node of the same graph, at a step
                                                    (omitted: its final checkpoint; `step: 2000` says
                                                    the same); in a sweep, that node of the same branch
    init: {run: runs/base, node: sft, step: 400}    a node of another run directory (step omitted:
                                                    its final checkpoint)
    init: {hf: checkpoints/afmoe-nano}              a Hugging Face afmoe directory (config.json and
                                                    safetensors)

The stage then loads that model (and, with `optimizer: true`, that optimizer state) instead of its
default upstream's. Paths are relative to the graph file. They are only read, never written, and
are not confined to the project as `use:` pieces are: a checkpoint usually lives in a shared
store, and nothing of it is ever printed. The paths themselves are execution-only: a node's
identity holds what was found there (the source node's identity and step, or the sha256 of the
Hugging Face files), so moving a directory re-runs nothing and changing its contents re-runs the
stage (trinity.graph.compile).
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from trinity.spec.base import SpecModel, execution_only
from trinity.spec.rules import Rules

MAX_STEP = 10**9
"""The largest step a source may be named at (spec.optim.MAX_STEPS; optim imports data, which imports this)."""
FROM = re.compile(r"^(?P<node>[^@\s]+)(?:@(?P<step>[0-9]{1,10}))?$")
"""`NODE` or `NODE@STEP` (a node id as the graph writes it, without a sweep label)."""


class InitSpec(SpecModel):
    """Where a training stage starts from, when not its default upstream (exactly one of from, run, hf)."""

    from_: str | None = Field(None, alias="from", max_length=1024)
    """A training node of this graph and optionally a step: `pretrain/stable` or `pretrain/stable@2000`."""
    run: str | None = execution_only(None, max_length=4096)
    """Another run directory (relative to the graph file); with `node` and optionally `step`."""
    node: str | None = Field(None, max_length=1024)
    """The node of `run` to start from (its id in that run's graph.json, sweep label included)."""
    step: int | None = Field(None, ge=0, le=MAX_STEP)
    """The committed checkpoint to start from (omitted: the final one): of `run`'s node, or of the `from` node
    (the same as `from: NODE@STEP`; a sweep over `init.step` shows the step in the branch labels)."""
    hf: str | None = execution_only(None, max_length=4096)
    """A Hugging Face afmoe directory (config.json, *.safetensors) (relative to the graph file)."""
    optimizer: bool = False
    """Also load the source's optimizer state (trinity sources only). [open] Default false: a stage that
    starts from another checkpoint is usually a new experiment (a cooldown, a fine-tune) whose optimizer
    groups or schedule differ, and Muon/AdamW moments rebuild within a few steps; a phase that must
    continue bit for bit as the source would sets true."""

    @model_validator(mode="after")
    def _rules(self) -> InitSpec:
        rules = Rules()
        given = [k for k, v in (("from", self.from_), ("run", self.run), ("hf", self.hf)) if v is not None]
        rules.check(
            len(given) == 1,
            given[1] if len(given) > 1 else (),
            "must be the only source: give exactly one of `from` (a node of this graph), `run` (+ `node`, `step`: "
            f"another run) or `hf` (a Hugging Face directory); got {', '.join(given) or 'none'}",
        )
        if self.from_ is not None:
            rules.check(
                FROM.match(self.from_) is not None,
                "from",
                f"= {self.from_!r} must be NODE or NODE@STEP, e.g. pretrain/stable@2000",
            )
        rules.check(self.run is None or self.node is not None, "node", "is required with `run`: the node to start from")
        rules.check(self.run is not None or self.node is None, "node", "is only allowed with `run`")
        rules.check(self.hf is None or self.step is None, "step", "is only allowed with `run` or `from`")
        rules.check(
            self.step is None or self.from_ is None or "@" not in self.from_,
            "step",
            f"is given twice: as `step` and in `from: {self.from_}`",
        )
        rules.check(
            not (self.optimizer and self.hf is not None),
            "optimizer",
            "= true is only allowed for trinity sources (`from`, `run`): a Hugging Face directory has no "
            "optimizer state",
        )
        rules.raise_if_any()
        return self

    @property
    def from_node(self) -> str | None:
        """The node of `from` (without its step)."""
        m = FROM.match(self.from_ or "")
        return m.group("node") if m else None

    @property
    def from_step(self) -> int | None:
        """The step of `from` (None: the final checkpoint)."""
        m = FROM.match(self.from_ or "")
        return int(m.group("step")) if m and m.group("step") else None
