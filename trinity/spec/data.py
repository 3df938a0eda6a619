"""The `data` section: named document sources and the pretraining phases drawn from them (PAPER.md 5)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from trinity.spec.base import SpecModel
from trinity.spec.rules import Rules


class JsonlSource(SpecModel):
    """Documents from JSON Lines files: one JSON object per line."""

    kind: Literal["jsonl"] = "jsonl"
    paths: tuple[str, ...]
    """Files or glob patterns (relative paths are relative to the graph file)."""
    text_field: str = "text"
    """The field holding each document's text."""


class ParquetSource(SpecModel):
    """Documents from Parquet files."""

    kind: Literal["parquet"] = "parquet"
    paths: tuple[str, ...]
    """Files or glob patterns (relative paths are relative to the graph file)."""
    text_column: str = "text"
    """The column holding each document's text."""


class FilesSource(SpecModel):
    """Each matching file is one document (source code, plain text)."""

    kind: Literal["files"] = "files"
    paths: tuple[str, ...]
    """Glob patterns, `**` allowed (relative paths are relative to the graph file)."""
    max_bytes: PositiveInt = 1_000_000
    """Files larger than this are skipped."""


class DemoSource(SpecModel):
    """A built-in corpus made on the spot with no download (Python's standard library, generated math)."""

    kind: Literal["demo"] = "demo"
    corpus: Literal["stdlib_code", "stdlib_docs", "math"]
    """Which part: the stdlib's source files, its docstrings and module docs, or arithmetic/algebra problems."""
    seed: int = 0
    """Seed of the corpus order and of the math generator."""
    max_documents: PositiveInt | None = None
    """Stop after this many documents (None: as many as the corpus has; math is endless)."""


Source = Annotated[JsonlSource | ParquetSource | FilesSource | DemoSource, Field(discriminator="kind")]


class RsdbLoader(SpecModel):
    """Random Sequential Document Buffer: random documents, each read sequentially from its read head."""

    kind: Literal["rsdb"] = "rsdb"
    buffer_size: PositiveInt = 4096
    """Configured documents per rank; the internal buffer holds 2x and refills at this occupancy."""
    workers: PositiveInt = 4
    """Loader workers per rank, each with its own slice of the buffer."""


class SequentialLoader(SpecModel):
    """The packing baseline: documents in order, leftovers carried to the next sequence."""

    kind: Literal["sequential"] = "sequential"
    workers: PositiveInt = 1
    """Loader workers per rank."""


Loader = Annotated[RsdbLoader | SequentialLoader, Field(discriminator="kind")]


class MixSpec(SpecModel):
    """A token budget drawn from weighted sources at one sequence length."""

    tokens: PositiveInt
    """Tokens to train on."""
    mix: dict[str, PositiveFloat]
    """Source name -> weight (relative; normalised over the mix)."""
    seq_len: PositiveInt = 4096
    """Training sequence length."""
    loader: Loader = RsdbLoader()
    """How sequences are packed from documents."""


class PhaseSpec(MixSpec):
    """One pretraining phase: a prepare node and a pretrain node."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    """Phase name (lowercase letters, digits, '-', '_'); becomes part of node ids."""


class DataSpec(SpecModel):
    """Sources by name, and the pretraining phases in order."""

    sources: dict[str, Source]
    """Source name -> where its documents come from."""
    phases: tuple[PhaseSpec, ...]
    """Pretraining phases, trained in this order, each continuing from the last."""
    holdout_documents: int = Field(64, ge=0)
    """Documents per source held out of training for held-out loss evals."""

    @model_validator(mode="after")
    def _rules(self) -> DataSpec:
        rules = Rules()
        rules.check(len(self.phases) > 0, "phases", "must list at least one pretraining phase")
        seen: set[str] = set()
        for i, phase in enumerate(self.phases):
            rules.check(phase.name not in seen, ("phases", i, "name"), f"= {phase.name!r} is used twice")
            seen.add(phase.name)
            check_mix(rules, ("phases", i, "mix"), phase.mix, self.sources)
        rules.raise_if_any()
        return self

    def phase(self, name: str) -> PhaseSpec:
        return next(p for p in self.phases if p.name == name)

    @property
    def pretrain_tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    @property
    def max_seq_len(self) -> int:
        return max(p.seq_len for p in self.phases)


def check_mix(rules: Rules, path: tuple[str | int, ...], mix: dict[str, float], sources: dict[str, Source]) -> None:
    """Mix weights must be non-empty and name defined sources (weights are positive by type)."""
    rules.check(len(mix) > 0, path, "must name at least one source")
    allowed = ", ".join(sorted(sources)) or "none defined"
    for name in mix:
        rules.check(
            name in sources,
            (*path, name),
            f"names source {name!r}, which data.sources does not define (defined: {allowed})",
        )
