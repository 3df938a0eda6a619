"""Each data-parallel rank's own streams of the job's training data (per-rank data).

The global stream of micro-batches is drawn from S = `data.streams` independent streams: global
micro-batch M (counted over the whole job) comes from stream M mod S, and stream s is a loader
serving "rank s of S" (its own share of each epoch's documents, its own length-biased draws, its
own conversations). The trainer numbers micro-batches so that the k-th one of rank r of W
data-parallel ranks is M = k W + r; when W divides S that is always one of the streams
s = r, r + W, r + 2W, ..., so rank r builds, reads and packs only those S / W streams, in turn:

    S = 4, W = 2      M     0  1  2  3  4  5  6  7  ...
                      s     0  1  2  3  0  1  2  3
                      rank  0  1  0  1  0  1  0  1      rank 0 owns streams 0, 2; rank 1 owns 1, 3

The micro-batches of an optimizer step are therefore the same whatever the layout (1, 2 or 4
ranks read the same global batch), and no rank assembles another rank's micro-batches.

State (`state_dict`): {"kind": "streams", "n_streams": S, "drawn": micro-batches drawn by the whole
job, "streams": [state of stream 0, ..., stream S - 1]}. Every rank gathers the states of the
others' streams (a collective: all ranks call it together), so the state is the same on every rank
(rank 0 saves a checkpoint's non-tensor leaves) and does not depend on the layout: a checkpoint
written by N ranks resumes on M ranks (N and M dividing S), each loading its own streams' states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch.distributed as dist

from trinity.data.packing import Batch
from trinity.distributed import step as collective
from trinity.errors import LayoutError

KIND = "streams"


class BatchStream(Protocol):
    """One data stream: a pretraining loader, length-biased draws, packed SFT conversations."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_streams(n_streams: int, world: int) -> None:
    """The layout can read `n_streams` streams only if its data-parallel ranks divide them."""
    if n_streams % world:
        raise LayoutError(
            f"data.streams = {n_streams} must be a multiple of the data-parallel ranks ({world} = parallel.nodes "
            f"x parallel.gpus_per_node / parallel.cp): rank r reads streams r, r + {world}, ...; set data.streams "
            f"to a multiple of {world} (the same value for every layout keeps the data the same)"
        )


class StreamSet:
    """The BatchSource of data-parallel rank `rank` of `world`: its own streams of `n_streams`.

    `make(s)` builds stream s; it is called only for this rank's streams. `rank` and `world` default
    to the job's (torch.distributed's default group: every rank is data-parallel, cp = 1).
    """

    def __init__(
        self, make: Callable[[int], BatchStream], n_streams: int, rank: int | None = None, world: int | None = None
    ) -> None:
        rank = collective.rank() if rank is None else rank
        world = collective.world_size() if world is None else world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        check_streams(n_streams, world)
        self.n_streams, self.rank, self.world = n_streams, rank, world
        self.streams: dict[int, BatchStream] = {s: make(s) for s in range(rank, n_streams, world)}
        self.next_index = rank
        """Global index M of this rank's next micro-batch."""

    @property
    def drawn(self) -> int:
        """Micro-batches drawn by the whole job (every rank draws as many)."""
        return self.next_index - self.rank

    def next_batch(self) -> Batch:
        batch = self.streams[self.next_index % self.n_streams].next_batch()
        self.next_index += self.world
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The state of all S streams, gathered from every rank (a collective when world > 1)."""
        parts = self._gather((self.drawn, {s: stream.state_dict() for s, stream in self.streams.items()}))
        drawn = sorted({d for d, _ in parts})
        if len(drawn) != 1:
            raise RuntimeError(f"the ranks drew different numbers of micro-batches ({drawn}): no common data position")
        states: dict[int, dict[str, Any]] = {}
        for _, own in parts:
            states.update(own)
        return {
            "kind": KIND,
            "n_streams": self.n_streams,
            "drawn": drawn[0],
            "streams": [states[s] for s in range(self.n_streams)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (written by any layout of the same data.streams): this rank's streams."""
        if state.get("kind") != KIND:
            raise ValueError(
                "the saved data position is not a set of data streams (written before data.streams existed?); "
                "it cannot be resumed by this version"
            )
        saved, drawn = int(state["n_streams"]), int(state["drawn"])
        if saved != self.n_streams:
            raise ValueError(
                f"the checkpoint's data was drawn from {saved} streams but data.streams = {self.n_streams}: "
                f"resume with data.streams = {saved}"
            )
        if drawn % self.world:
            raise ValueError(
                f"the checkpoint was taken after {drawn} micro-batches, which {self.world} data-parallel ranks "
                "cannot continue evenly (the global batch in micro-batches must be a multiple of the ranks)"
            )
        for s, stream in self.streams.items():
            stream.load_state_dict(state["streams"][s])
        self.next_index = drawn + self.rank

    def _gather(self, own: Any) -> list[Any]:
        if self.world == 1:
            return [own]
        if not collective.distributed() or dist.get_world_size() != self.world:
            raise RuntimeError(f"rank {self.rank} of {self.world} needs a process group of {self.world} ranks")
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, own)
        return parts
