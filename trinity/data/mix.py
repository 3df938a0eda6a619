"""How a phase's token budget and mix weights become documents of each source.

- Quotas: source s gets `round(tokens * w_s / sum(w))` tokens (`quotas`). Tokens count the boundary
  token each document ends with.
- Held out: the first `holdout_documents` documents of every source's stream are never trained on;
  they go to the phase's held-out store (the same documents in every phase, so held-out loss is
  comparable across phases).
- Taking documents: after the held-out ones, documents are taken whole, in stream order, until the
  source's quota is met (the last one may overshoot by less than one document). The documents of
  each source are tokenized in parallel, but always taken in stream order, so the result does not
  depend on the number of workers.
- A finite source that runs out is read again from its start (skipping the held-out documents again);
  `passes` counts the passes, so a repeated corpus shows in the store's attributes. A source with no
  document beyond its held-out ones is an error, as is needing more than `max_passes` passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from trinity.data.sources import iter_documents
from trinity.errors import MixError
from trinity.spec.data import Source

BATCH_DOCUMENTS = 32
MAX_PASSES = 1000


def quotas(tokens: int, mix: dict[str, float]) -> dict[str, int]:
    """Token quota of each source: tokens x weight / sum(weights), rounded."""
    total = sum(mix.values())
    return {name: round(tokens * w / total) for name, w in mix.items()}


@dataclass
class TakenDocument:
    """One tokenized document of a source, and whether it is held out."""

    ids: list[int]
    heldout: bool
    passes: int


def _stream(source: Source, base_dir: Path, holdout: int, name: str) -> Iterator[tuple[str, bool, int]]:
    """(text, heldout, pass) forever: the held-out documents once, then the rest, pass after pass."""
    count = 0
    for i, text in enumerate(iter_documents(source, base_dir)):
        count += 1
        yield text, i < holdout, 1
    if count <= holdout:
        raise MixError(
            f"source {name!r} has {count} documents, none left after holding out {holdout}; "
            "lower data.holdout_documents or add documents"
        )
    passes = 1
    while True:
        passes += 1
        if passes > MAX_PASSES:
            raise MixError(f"source {name!r} would need more than {MAX_PASSES} passes to fill its quota")
        for text in islice(iter_documents(source, base_dir), holdout, None):
            yield text, False, passes


def take_documents(
    name: str,
    source: Source,
    quota: int,
    holdout: int,
    base_dir: Path,
    encode_batch: Callable[[list[str]], list[list[int]]],
    workers: int = 1,
) -> Iterator[TakenDocument]:
    """The held-out documents of a source, then training documents until `quota` tokens are taken.

    `encode_batch` returns each text's ids including its boundary token. Batches of documents are
    encoded on `workers` threads (the tokenizer's Rust core releases the GIL), a bounded number ahead.
    """
    stream = _stream(source, base_dir, holdout, name)
    taken = 0
    held = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        inflight: list[tuple[list[tuple[str, bool, int]], Future[list[list[int]]]]] = []

        def submit() -> bool:
            batch = list(islice(stream, BATCH_DOCUMENTS))
            if batch:
                inflight.append((batch, pool.submit(encode_batch, [t for t, _, _ in batch])))
            return bool(batch)

        for _ in range(2 * max(1, workers)):
            submit()
        while inflight:
            batch, future = inflight.pop(0)
            for (_, heldout, passes), ids in zip(batch, future.result(), strict=True):
                if heldout:
                    held += 1
                    yield TakenDocument(ids, True, passes)
                    continue
                if taken >= quota:
                    for _, f in inflight:
                        f.cancel()
                    return
                taken += len(ids)
                yield TakenDocument(ids, False, passes)
            submit()
