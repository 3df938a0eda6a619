"""How each rank of a multi-process node attempt ended: attempts/NNNN.ranks/rank-KKKKK.json.

Rank 0 alone writes the node's status and attempt record. The other ranks tell it (and the
executor) how they ended through these files, each written by its own rank before that rank
leaves the process group, so a rank that sees a peer's connection close finds the peer's reason
already on disk. The attempt ends as the earliest rank that did not succeed: a rank that failed
first is the cause; the others only saw it go.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field

from trinity.run.layout import NodeDir, atomic_write_json, read_json


@dataclass(frozen=True)
class RankEnd:
    """How one rank's process ended its part of an attempt."""

    rank: int
    state: str
    """SUCCEEDED, FAILED or STOPPED."""
    exit_code: int
    message: str = ""
    time: float = field(default_factory=time.time)
    """When the rank's body ended (seconds since the epoch): the earliest non-success is the cause."""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


def ranks_dir(node_dir: NodeDir, attempt: int) -> NodeDir:
    """The folder of an attempt's rank records (beside attempts/NNNN.json, not matched by its glob)."""
    return NodeDir(node_dir.attempts / f"{attempt:04d}.ranks")


def write_rank_end(node_dir: NodeDir, attempt: int, end: RankEnd) -> None:
    atomic_write_json(ranks_dir(node_dir, attempt).root / f"rank-{end.rank:05d}.json", asdict(end))


def read_rank_ends(node_dir: NodeDir, attempt: int) -> dict[int, RankEnd]:
    """The ranks that recorded their end, by rank."""
    folder = ranks_dir(node_dir, attempt).root
    if not folder.is_dir():
        return {}
    ends = {}
    for path in sorted(folder.glob("rank-*.json")):
        data = read_json(path)
        end = RankEnd(**{k: v for k, v in data.items() if k in RankEnd.__dataclass_fields__})
        ends[end.rank] = end
    return ends


def deciding_end(ends: list[RankEnd]) -> RankEnd | None:
    """The end that decides the attempt: the earliest that did not succeed (None: all succeeded)."""
    unsuccessful = [e for e in ends if e.state != "SUCCEEDED"]
    return min(unsuccessful, key=lambda e: (e.time, e.rank)) if unsuccessful else None
