"""Before anything runs: how far into each source's stream every prepare node will read (`trinity plan`).

Each phase's prepare continues every source where the previous phases stopped, reading a source from its
start again only once it is exhausted (trinity.nodes.prepare). The plan shows, per prepare node and
source: the tokens it takes, the tokens earlier phases took before it, and, when the size of one pass over
the source is known, the passes it reads in. A pass's size is the text bytes its files hold (a compressed
file counts its compressed size: an underestimate, so passes are overestimated), divided by
`BYTES_PER_TOKEN`: the tokenizer does not exist yet when a plan is made. [open] 4.0 bytes per token is a
usual figure for a byte-level BPE on English web text; the prepare's metrics give the measured passes.
A source that cannot be listed (a cluster path on a laptop) is "unknown" with the reason: a plan never
fails on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trinity.data.demo import stdlib_files
from trinity.data.mix import quotas
from trinity.data.sources import Address, SourceReader
from trinity.errors import TrinityError
from trinity.spec.data import DemoSource, MixSpec, Source
from trinity.spec.experiment import ExperimentSpec

BYTES_PER_TOKEN = 4.0
WHOLE_PASS = 1 << 62
"""A piece size no pass reaches: one piece holds a whole pass (its estimate is the pass's bytes)."""


def pass_bytes(source: Source, base_dir: Path | str) -> tuple[int | None, str]:
    """(text bytes in one pass over the source, or None; why None: 'endless' or what is unknown)."""
    if isinstance(source, DemoSource):
        if source.corpus == "math" and source.max_documents is None:
            return None, "endless"
        if source.corpus == "stdlib_code" and source.max_documents is None:  # each file one document
            return sum(f.stat().st_size for f in stdlib_files()), ""
        return None, "unknown before the prepare (a demo corpus made on the spot)"
    try:
        reader = SourceReader(source, base_dir)
        return sum(p.est_bytes for p in reader.pieces(Address(0, 0), WHOLE_PASS)), ""
    except (OSError, TrinityError, ValueError) as exc:
        return None, f"unknown: {exc}"


def prepare_mixes(spec: ExperimentSpec) -> list[tuple[str, MixSpec]]:
    """The prepare nodes in stream order (the phases, then the extension) with their mixes."""
    mixes: list[tuple[str, MixSpec]] = [(f"prepare/{p.name}", p) for p in spec.data.phases]
    if spec.stages.extend is not None:
        mixes.append(("prepare/extend", spec.stages.extend))
    return mixes


def stream_estimates(spec: ExperimentSpec, base_dir: Path | str) -> dict[str, dict[str, dict[str, Any]]]:
    """prepare node -> source -> {tokens, tokens_before, pass_tokens (None: unknown), first_pass, last_pass
    (None: unknown), note}, in stream order."""
    sizes = {name: pass_bytes(src, base_dir) for name, src in spec.data.sources.items()}
    taken = dict.fromkeys(spec.data.sources, 0)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for node, mix in prepare_mixes(spec):
        rows: dict[str, dict[str, Any]] = {}
        for name, tokens in quotas(mix.tokens, mix.mix).items():
            size, note = sizes[name]
            pass_tokens = int(size / BYTES_PER_TOKEN) if size else None
            before = taken[name]
            first = last = None
            if pass_tokens:
                first, last = before // pass_tokens + 1, max(before, before + tokens - 1) // pass_tokens + 1
            elif note == "endless":
                first = last = 1
            rows[name] = {
                "tokens": tokens,
                "tokens_before": before,
                "pass_tokens": pass_tokens,
                "first_pass": first,
                "last_pass": last,
                "note": note or (f"at {BYTES_PER_TOKEN} bytes per token" if pass_tokens else "empty"),
            }
            taken[name] = before + tokens
        out[node] = rows
    return out
