"""The `data` section: named document sources and the pretraining phases drawn from them (PAPER.md 5)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveFloat, PositiveInt, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from trinity.spec.base import SpecModel
from trinity.spec.init import InitSpec
from trinity.spec.names import Name
from trinity.spec.rules import Rules

# Upper bounds on sizes: far above any real run, low enough that nothing derived from a spec
# (step counts, estimates, lists per layer) can take long or overflow a float.
MAX_TOKENS = 10**16
"""Tokens of one phase or stage (Trinity Large pretrained on 17T = 1.7e13)."""
MAX_SEQ_LEN = 2**24
"""Tokens in one sequence (16.8M; Trinity Large evaluates at up to 1M)."""
MAX_COUNT = 10**12
"""Documents, bytes per file and other counts of things read from the data."""
MAX_WORKERS = 1024
"""Loader workers per data stream."""
MAX_STREAMS = 2**20
"""Data streams of a job (Trinity Large reads 2048, one per GPU)."""


MAX_FILES = 1_000_000
"""Files one source may match (its patterns together); more is an error, not a silent truncation."""


class JsonlSource(SpecModel):
    """Documents from JSON Lines files: one JSON object per line, plain or compressed (`.gz`, `.zst`,
    inferred from each file's name)."""

    kind: Literal["jsonl"] = "jsonl"
    paths: tuple[str, ...] = Field(min_length=1)
    """Files, glob patterns (`**` allowed) or fsspec URLs (`file://`, `s3://`, `gs://`: the scheme's fsspec
    package must be installed); relative plain paths are relative to the graph file."""
    text_field: str = "text"
    """The field holding each document's text."""


FilterScalar = StrictBool | StrictInt | StrictFloat | StrictStr
"""A value a Parquet filter compares a column with."""


class ParquetFilter(SpecModel):
    """One term of a Parquet row filter, `column op value`, evaluated by pyarrow
    (`pq.filters_to_expression`): a comparison with a null value drops the row."""

    column: str
    """The column the term tests."""
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
    """The comparison; `in` and `not in` test membership in a list."""
    value: FilterScalar | tuple[FilterScalar, ...]
    """What the column is compared with: a scalar, or a list for `in` / `not in`."""

    @model_validator(mode="after")
    def _rules(self) -> ParquetFilter:
        rules = Rules()
        is_list = isinstance(self.value, tuple)
        if self.op in ("in", "not in"):
            rules.check(is_list, "value", f"must be a list for op {self.op!r} (got {self.value!r})")
        else:
            rules.check(not is_list, "value", f"must be a single value for op {self.op!r} (a list needs 'in')")
        rules.raise_if_any()
        return self


class ParquetSource(SpecModel):
    """Documents from Parquet files: one per row of a string column, optionally filtered."""

    kind: Literal["parquet"] = "parquet"
    paths: tuple[str, ...] = Field(min_length=1)
    """Files, glob patterns (`**` allowed) or fsspec URLs (`file://`, `s3://`, `gs://`: the scheme's fsspec
    package must be installed); relative plain paths are relative to the graph file."""
    text_column: str = "text"
    """The column holding each document's text (a string column)."""
    filter: tuple[ParquetFilter, ...] = ()
    """Terms a row must all pass to be a document (ANDed), e.g. `{column: lang, op: '==', value: en}`."""


class FilesSource(SpecModel):
    """Each matching file is one document (source code, plain text)."""

    kind: Literal["files"] = "files"
    paths: tuple[str, ...] = Field(min_length=1)
    """Files, glob patterns (`**` allowed) or fsspec URLs; relative plain paths are relative to the graph
    file."""
    max_bytes: PositiveInt = Field(1_000_000, le=MAX_COUNT)
    """Files larger than this are skipped."""


class DemoSource(SpecModel):
    """A built-in corpus made on the spot with no download (Python's standard library, generated math)."""

    kind: Literal["demo"] = "demo"
    corpus: Literal["stdlib_code", "stdlib_docs", "math"]
    """Which part: the stdlib's source files, its docstrings and module docs, or arithmetic/algebra problems."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Seed of the corpus order and of the math generator (a 64-bit integer)."""
    max_documents: PositiveInt | None = Field(None, le=MAX_COUNT)
    """Stop after this many documents (None: as many as the corpus has; math is endless)."""


Source = Annotated[JsonlSource | ParquetSource | FilesSource | DemoSource, Field(discriminator="kind")]


class RsdbLoader(SpecModel):
    """Random Sequential Document Buffer: random documents, each read sequentially from its read head."""

    kind: Literal["rsdb"] = "rsdb"
    buffer_size: PositiveInt = Field(4096, le=2**24)
    """Configured documents per data stream; the internal buffer holds 2x and refills at this occupancy."""
    workers: PositiveInt = Field(4, le=MAX_WORKERS)
    """Loader workers per data stream, each with its own slice of the buffer."""


class SequentialLoader(SpecModel):
    """The packing baseline: documents in order, leftovers carried to the next sequence."""

    kind: Literal["sequential"] = "sequential"
    workers: PositiveInt = Field(1, le=MAX_WORKERS)
    """Loader workers per data stream."""


Loader = Annotated[RsdbLoader | SequentialLoader, Field(discriminator="kind")]


class ContinueLR(SpecModel):
    """Decay from one fraction of the peak to another over the stage's steps (Large: cosine 0.1 -> 0.05)."""

    kind: Literal["continue"] = "continue"
    from_fraction: PositiveFloat = 0.1
    """Starting lr as a fraction of the pretraining peak."""
    to_fraction: float = Field(0.05, ge=0.0)
    """Final lr as a fraction of the pretraining peak."""
    decay: Literal["linear", "cosine"] = "cosine"
    """Shape of the decay."""


class MixSpec(SpecModel):
    """A token budget drawn from weighted sources at one sequence length."""

    tokens: PositiveInt = Field(le=MAX_TOKENS)
    """Tokens to train on (at most 1e16)."""
    mix: dict[str, PositiveFloat]
    """Source name -> weight (relative; normalised over the mix)."""
    seq_len: PositiveInt = Field(4096, le=MAX_SEQ_LEN)
    """Training sequence length."""
    loader: Loader = RsdbLoader()
    """How sequences are packed from documents."""


class PhaseSpec(MixSpec):
    """One pretraining phase: a prepare node and a pretrain node."""

    name: Name
    """Phase name (letters, digits, '.', '-', '_'); becomes part of node ids and folders."""
    init: InitSpec | None = None
    """Start from this checkpoint instead of the previous phase's final one (or, for the first phase, a
    fresh initialisation) (trinity.spec.init). Steps and tokens continue from the source's, so the
    token-based batch schedule continues; a Hugging Face source starts at step 0."""
    lr: ContinueLR | None = None
    """The phase's own learning-rate rule, from `from_fraction` to `to_fraction` of each group's peak over
    the phase's steps (a decay branch that starts from `init`); None: optim.schedule over all phases."""


class DataSpec(SpecModel):
    """Sources by name, and the pretraining phases in order."""

    sources: dict[Name, Source]
    """Source name (letters, digits, '.', '-', '_') -> where its documents come from."""
    phases: tuple[PhaseSpec, ...] = Field(max_length=1024)
    """Pretraining phases, trained in this order, each continuing from the last."""
    holdout_documents: int = Field(64, ge=0, le=MAX_COUNT)
    """Documents per source held out of training for held-out loss evals."""
    streams: PositiveInt = Field(1, le=MAX_STREAMS)
    """Independent streams the training data is drawn from (pretraining, extension, SFT): global
    micro-batch M comes from stream M mod streams, and each data-parallel rank builds, reads and packs
    only its own streams (rank r of W: streams r, r + W, ...). The data-parallel ranks (parallel.nodes x
    parallel.gpus_per_node / parallel.cp) must divide it; the data then does not depend on the layout, so
    1 rank and W ranks train on the same batches. [open]: the paper runs one loader per GPU, so the
    presets set their data-parallel ranks."""

    @model_validator(mode="after")
    def _rules(self) -> DataSpec:
        rules = Rules()
        rules.check(len(self.phases) > 0, "phases", "must list at least one pretraining phase")
        seen: dict[str, str] = {}
        for i, phase in enumerate(self.phases):
            check_unique(rules, ("phases", i, "name"), phase.name, seen)
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


def check_unique(rules: Rules, path: tuple[str | int, ...], name: str, seen: dict[str, str]) -> None:
    """A name that becomes a folder must differ from the others in more than case: folders of
    `Phase1` and `phase1` are one folder on a case-insensitive file system (macOS, Windows)."""
    other = seen.get(name.casefold())
    if other is None:
        seen[name.casefold()] = name
        return
    same_case = "" if other == name else f" (as {other!r}: names that differ only in case share a folder)"
    rules.check(False, path, f"= {name!r} is used twice{same_case}")


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
