"""Where each source's stream stands: the phases of a run continue it instead of re-reading it.

A source is read as an endless stream of passes. Pass 1 starts after the held-out documents (the
first `holdout_documents` documents of the source, the same in every phase, never trained on);
when a pass reaches the end of a finite source, pass + 1 starts again after the held-out ones.
A `Position` is where the next document of a source's stream starts: its pass, its address in the
pass (`trinity.data.sources.Address`), the file at that address (to notice a changed file list
between phases) and how many training documents all phases so far have taken.

A phase's training store records, per source, `source_start` (where this phase began) and
`source_positions` (where the next phase begins: after this phase's last document; a source not
in this phase's mix carried over unchanged). `end_positions(store_dir)` reads the latter for the
next phase's prepare; the first phase starts every source at `first_position`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trinity.data.sources import Address, SourceReader
from trinity.data.store import open_store
from trinity.errors import MixError, StoreError

MAX_PASSES = 1000


@dataclass(frozen=True)
class Position:
    """Where the next document of a source's stream starts, and how many documents came before."""

    passes: int
    """The pass (1-based) the next document is read in."""
    file: int
    offset: int
    path: str | None
    """The file at `file` in the source's file list (None past its last file, or without files)."""
    documents: int
    """Training documents taken from this source by all phases so far."""

    @property
    def address(self) -> Address:
        return Address(self.file, self.offset)

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.passes,
            "file": self.file,
            "offset": self.offset,
            "path": self.path,
            "documents": self.documents,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Position:
        path = value["path"]
        return cls(
            int(value["pass"]),
            int(value["file"]),
            int(value["offset"]),
            None if path is None else str(path),
            int(value["documents"]),
        )


def file_at(reader: SourceReader, address: Address) -> str | None:
    """The file an address points into (None past the last file, or for a source without files)."""
    return reader.files[address.file] if 0 <= address.file < len(reader.files) else None


def at(reader: SourceReader, passes: int, address: Address, documents: int) -> Position:
    """The position of `address` in pass `passes` of a source."""
    return Position(passes, address.file, address.offset, file_at(reader, address), documents)


def first_position(reader: SourceReader, boundary: Address) -> Position:
    """Where the first phase starts a source: pass 1, right after its held-out documents."""
    return at(reader, 1, boundary, 0)


def resume(name: str, reader: SourceReader, position: Position) -> Position:
    """Check a recorded position against the source as it is now (a position at the end of a pass stays
    there: the next pass begins when the plan finds nothing left in this one).

    The file list may not change under a run: the position's file must still be the one at its index
    (a file added or removed before it would silently shift the stream), else a MixError naming the source.
    """
    if position.path != file_at(reader, position.address):
        raise MixError(
            f"source {name!r} changed since the previous phase: file {position.file} was {position.path!r}, "
            f"is now {file_at(reader, position.address)!r}; the phases of a run must read the same files"
        )
    return position


def next_pass(name: str, reader: SourceReader, position: Position, boundary: Address) -> Position:
    """The start of the pass after `position`'s (an error beyond MAX_PASSES)."""
    if position.passes + 1 > MAX_PASSES:
        raise MixError(f"source {name!r} would need more than {MAX_PASSES} passes to fill its quota")
    return at(reader, position.passes + 1, boundary, position.documents)


def end_positions(store_dir: Path | str) -> dict[str, Position]:
    """Where the next phase continues each source: the `source_positions` of a prepare's train store.

    `store_dir` is a prepare node's store folder (holding `train` and `heldout`).
    """
    train = open_store(Path(store_dir) / "train")
    recorded = train.attrs.get("source_positions")
    if not isinstance(recorded, dict):
        raise StoreError(f"{train.path} records no source positions (an older prepare); run that prepare again")
    return {name: Position.from_json(value) for name, value in recorded.items()}
