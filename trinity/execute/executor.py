"""What every executor offers the scheduler: launch a node attempt, poll it, stop it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Finished:
    """How an attempt ended, as the executor saw it."""

    exit_code: int | None
    signal: int | None
    message: str = ""


class Handle(Protocol):
    """A launched attempt."""

    node_id: str
    attempt: int

    def poll(self) -> Finished | None:
        """None while it runs; how it ended once it has."""
        ...

    def stop(self) -> None:
        """Ask it to stop (commit a checkpoint and exit); escalate if it does not."""
        ...

    def kill(self) -> None:
        """End it at once, every process of it (a hung attempt, which cannot act on a stop request)."""
        ...


class Executor(Protocol):
    name: str

    def check(self, node_ids: list[str]) -> None:
        """Raise RunError, before anything runs, if a node cannot be launched here as its spec asks."""
        ...

    def slots(self, node_id: str) -> int:
        """How many of the scheduler's `jobs` an attempt of the node occupies (its processes)."""
        ...

    def launch(self, node_id: str, attempt: int) -> Handle: ...
