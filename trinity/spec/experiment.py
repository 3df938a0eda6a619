"""A whole experiment graph file: every section, an optional sweep, and the rules that span sections."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import Field, model_validator

from trinity.spec.base import SpecModel, execution_only
from trinity.spec.data import DataSpec, check_mix, check_unique
from trinity.spec.execution import ExecutionSpec
from trinity.spec.model import ModelSpec
from trinity.spec.names import Name
from trinity.spec.optim import OptimSpec
from trinity.spec.parallel import ParallelSpec
from trinity.spec.rules import Rules
from trinity.spec.stability import StabilitySpec
from trinity.spec.stages import StagesSpec, check_eval_every
from trinity.spec.tokenizer import TokenizerSpec

MAX_BRANCHES = 1024
"""Branches (grid points) of one sweep: each is validated, compiled and estimated on its own."""


LAYOUT = ("parallel.nodes", "parallel.gpus_per_node", "parallel.cp", "parallel.micro_batch")
"""The layout fields a global batch is split by (data-parallel ranks x micro_batch): a broken batch rule
names where each was set, and is blamed on the one the user wrote (trinity.spec.rules: Violation.related)."""
LAYOUT_HINT = (
    ": each rank takes whole micro-batches; fit the layout to the batch (parallel.* never changes an identity), "
    "or change the batch (its nodes re-run)"
)


class SweepSpec(SpecModel):
    """A grid over field paths: one branch per combination; unchanged upstream nodes are shared."""

    grid: dict[str, Annotated[tuple[Any, ...], Field(min_length=1)]] = Field(min_length=1)
    """Dotted field path -> values (at least one), e.g. {'optim.muon.lr': [1e-3, 2e-3]}."""

    @model_validator(mode="after")
    def _rules(self) -> SweepSpec:
        rules = Rules()
        points = math.prod(len(values) for values in self.grid.values())
        rules.check(
            points <= MAX_BRANCHES,
            "grid",
            f"makes {points} branches ({' x '.join(str(len(v)) for v in self.grid.values())}); "
            f"at most {MAX_BRANCHES} are allowed: split the sweep",
        )
        rules.raise_if_any()
        return self


class ExperimentSpec(SpecModel):
    """An experiment graph: the recipe from tokenizer to RL, its layout, and how it is executed."""

    name: Name
    """Experiment name (letters, digits, '.', '-', '_'); the run directory is `runs/<name>`."""
    description: str = ""
    """Free text shown by `trinity plan`."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Seed of model init, data order and sampling (a 64-bit integer)."""
    model: ModelSpec
    """Architecture."""
    tokenizer: TokenizerSpec
    """Tokenizer training."""
    data: DataSpec
    """Sources and pretraining phases."""
    stability: StabilitySpec = StabilitySpec()
    """Balancing and stability settings."""
    optim: OptimSpec = OptimSpec()
    """Optimizers and schedules of pretraining."""
    parallel: ParallelSpec = ParallelSpec()
    """The GPU layout."""
    stages: StagesSpec = StagesSpec()
    """Context extension, SFT, RL and evals."""
    execution: ExecutionSpec = execution_only(ExecutionSpec())
    """Executor, cadences and paths (never part of identity)."""
    sweep: SweepSpec | None = None
    """Optional grid sweep."""

    @model_validator(mode="after")
    def _rules(self) -> ExperimentSpec:
        rules = Rules()
        self._check_lengths(rules)
        self._check_batches(rules)
        self._check_references(rules)
        self._check_schedule(rules)
        rules.raise_if_any()
        return self

    def _check_schedule(self, rules: Rules) -> None:
        start, total = self.optim.schedule.decay_start_tokens, self.data.pretrain_tokens
        rules.check(
            start is None or start < total,
            ("optim", "schedule", "decay_start_tokens"),
            f"= {start} must be below the total pretraining tokens ({total}, the sum of data.phases[*].tokens): "
            f"the decay runs from there to the end of pretraining; allowed: 0 to {total - 1}",
        )

    def _check_lengths(self, rules: Rules) -> None:
        rules.check(
            self.tokenizer.vocab_size <= self.model.vocab_size,
            "tokenizer.vocab_size",
            f"= {self.tokenizer.vocab_size} must be <= model.vocab_size ({self.model.vocab_size})",
        )
        rules.check(
            self.model.moe.n_experts % self.parallel.ep == 0,
            "model.moe.n_experts",
            f"= {self.model.moe.n_experts} must be divisible by parallel.ep ({self.parallel.ep})",
        )
        # A graph trains a MoE (expert balancing, MaxVio, the `moe` section); a lone ModelSpec may be dense.
        rules.check(
            self.model.n_dense_layers < self.model.n_layers,
            "model.n_dense_layers",
            f"= {self.model.n_dense_layers} leaves no MoE layer (model.n_layers = {self.model.n_layers}), so "
            "model.moe would be unused; set n_dense_layers below n_layers (Trinity: 2 of 56 in Nano)",
        )
        longest = self.longest_seq_len
        rules.check(
            self.model.sliding_window <= longest,
            "model.sliding_window",
            f"= {self.model.sliding_window} must be <= the longest sequence length ({longest})",
        )
        extend = self.stages.extend
        if extend is not None:
            pretrain_len = self.data.max_seq_len
            rules.check(
                extend.seq_len > pretrain_len,
                "stages.extend.seq_len",
                f"= {extend.seq_len} must be greater than the pretraining sequence length ({pretrain_len})",
            )
            rules.check(
                extend.target_len > pretrain_len,
                "stages.extend.target_len",
                f"= {extend.target_len} must be greater than the pretraining sequence length ({pretrain_len})",
            )

    def _check_batches(self, rules: Rules) -> None:
        par = self.parallel
        unit = par.dp_ranks() * par.micro_batch
        for i, step in enumerate(self.optim.batch):
            rules.check(
                par.divides_batch(step.sequences),
                ("optim", "batch", i, "sequences"),
                f"= {step.sequences} must be divisible by data-parallel ranks x micro_batch "
                f"({par.dp_ranks()} x {par.micro_batch} = {unit}){LAYOUT_HINT}",
                LAYOUT,
            )
        streams, dp = self.data.streams, par.dp_ranks()
        rules.check(
            streams % dp == 0,
            ("data", "streams"),
            f"= {streams} must be a multiple of the data-parallel ranks (parallel.nodes x parallel.gpus_per_node / "
            f"parallel.cp = {par.nodes} x {par.gpus_per_node} / {par.cp} = {dp}): each rank reads its own streams",
            LAYOUT[:3],
        )
        extend = self.stages.extend
        if extend is not None:
            cp = extend.cp or par.cp
            rules.check(
                par.total_ranks % cp == 0,
                "stages.extend.cp",
                f"= {cp} must divide the world size ({par.total_ranks})",
            )
            if par.total_ranks % cp == 0:
                unit_cp = par.dp_ranks(cp) * par.micro_batch
                rules.check(
                    par.divides_batch(extend.global_batch_sequences, cp),
                    "stages.extend.global_batch_sequences",
                    f"= {extend.global_batch_sequences} must be divisible by data-parallel ranks x micro_batch "
                    f"({par.dp_ranks(cp)} x {par.micro_batch} = {unit_cp}; world {par.total_ranks} / cp {cp})"
                    f"{LAYOUT_HINT}",
                    (*LAYOUT[:2], "stages.extend.cp" if extend.cp else "parallel.cp", LAYOUT[3]),
                )
        sft = self.stages.sft
        if sft is not None:
            rules.check(
                par.divides_batch(sft.global_batch_sequences),
                "stages.sft.global_batch_sequences",
                f"= {sft.global_batch_sequences} must be divisible by data-parallel ranks x micro_batch "
                f"({par.dp_ranks()} x {par.micro_batch} = {unit}){LAYOUT_HINT}",
                LAYOUT,
            )

    def _check_references(self, rules: Rules) -> None:
        sources = self.data.sources
        for name in self.tokenizer.sources or ():
            rules.check(
                name in sources,
                ("tokenizer", "sources"),
                f"names source {name!r}, which data.sources does not define (defined: {', '.join(sorted(sources))})",
            )
        if self.stages.extend is not None:
            check_mix(rules, ("stages", "extend", "mix"), self.stages.extend.mix, sources)
        if self.stages.rl is not None:
            rules.check(
                self.stages.sft is not None,
                "stages.rl",
                "needs stages.sft: RL starts from the SFT checkpoint",
            )
        allowed = self.stage_references()
        names: dict[str, str] = {}
        for i, ev in enumerate(self.stages.evals):
            check_unique(rules, ("stages", "evals", i, "name"), ev.name, names)
            check_eval_every(rules, i, ev, self.execution.checkpoint.every)
            for ref in ev.after:
                rules.check(
                    ref in allowed,
                    ("stages", "evals", i, "after"),
                    f"names stage {ref!r}, which this graph does not have (allowed: {', '.join(allowed)})",
                )
        exports: dict[str, str] = {}
        for i, ex in enumerate(self.stages.exports):
            rules.check(
                ex.after in allowed,
                ("stages", "exports", i, "after"),
                f"names stage {ex.after!r}, which this graph does not have (allowed: {', '.join(allowed)})",
            )
            node_id = f"export/{ex.label}@{ex.after}"
            rules.check(
                node_id.casefold() not in exports,
                ("stages", "exports", i, "name"),
                f"makes node {node_id}, as another export does ({exports.get(node_id.casefold())}): "
                "give one of them another `name`",
            )
            exports.setdefault(node_id.casefold(), node_id)

    def stage_references(self) -> tuple[str, ...]:
        """Names an eval or export may refer to: 'pretrain', 'pretrain:PHASE' for each phase, and present stages."""
        refs = ["pretrain", *(f"pretrain:{p.name}" for p in self.data.phases)]
        refs += [s for s in ("extend", "sft", "rl") if getattr(self.stages, s) is not None]
        return tuple(refs)

    def pretrain_steps(self) -> tuple[int, ...]:
        """Optimizer steps of each pretraining phase, following the batch-size schedule by tokens seen.

        Phases continue one another: the tokens a phase's last step overshoots its budget by count
        as seen when the next phase starts (`OptimSpec.batch_steps`). Phase i trains the global
        steps [sum(steps[:i]), sum(steps[:i + 1])).
        """
        steps: list[int] = []
        seen = 0
        for phase in self.data.phases:
            n, seen = self.optim.batch_steps(seen, phase.tokens, phase.seq_len)
            steps.append(n)
        return tuple(steps)

    @property
    def longest_seq_len(self) -> int:
        lengths = [self.data.max_seq_len]
        if self.stages.extend is not None:
            lengths.append(self.stages.extend.seq_len)
        if self.stages.sft is not None:
            lengths.append(self.stages.sft.seq_len)
        return max(lengths)
