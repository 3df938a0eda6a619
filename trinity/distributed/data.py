"""Each data-parallel rank's slice of one global stream of micro-batches.

The global batch of an optimizer step is the same sequence of micro-batches whatever the layout:
micro-batch m of the stream goes to rank m mod world. Every rank runs the same loader (same seed,
same state) and keeps only its own micro-batches, so

- the union over ranks of one step's micro-batches is exactly the single-process step's batch;
- the loader state is the same on every rank: rank 0 saves it, and a checkpoint written by N
  ranks resumes on M ranks with the same batches (the stream does not depend on the layout).

The cost is that every rank assembles all micro-batches of the step (packing is thousands of
times faster than training the tiny model on this CPU; at GPU scale per-rank document shards
would be needed instead).
"""

from __future__ import annotations

from typing import Any

from trinity.data.packing import Batch


class RankSlice:
    """A BatchSource serving micro-batches rank, rank + world, rank + 2 world, ... of `source`."""

    def __init__(self, source: Any, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.source, self.rank, self.world = source, rank, world

    def next_batch(self) -> Batch:
        batch: Batch | None = None
        for position in range(self.world):
            drawn: Batch = self.source.next_batch()
            if position == self.rank:
                batch = drawn
        assert batch is not None
        return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.source.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)
