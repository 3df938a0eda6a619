"""Every error a user is meant to read: one root, `TrinityError`, and a type per place it comes from.

A `TrinityError`'s message is the whole story: what is wrong, where (file and line, field, node,
run directory) and what to do next. The CLI prints it as one line (a `SpecError` as one line per
problem) and exits with status 2, without a traceback. Anything else that escapes is a bug in
trinity and is reported as such (exit 1, traceback with --debug).

Two exceptions here are not failures but requests, so they are not `TrinityError`s: `StopRequested`
(a node body is asked to stop at its next checkpoint) and `Interrupted` (the scheduler was stopped
by Ctrl-C; a `KeyboardInterrupt`, so only code that handles Ctrl-C handles it).
"""

from __future__ import annotations


class TrinityError(Exception):
    """An error whose message tells the user what is wrong and what to do."""


class SpecError(TrinityError):
    """A spec that cannot be used; `lines` are the problems, each naming file, line and field."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


class RunError(TrinityError):
    """A run directory that cannot be used as asked (not a run, locked, a layout this executor cannot launch)."""


class NodeFailure(TrinityError):
    """A node cannot finish; the message is what the user reads in `trinity status`."""


class CheckpointError(TrinityError):
    """A checkpoint that cannot be written or read back as it was committed."""


class CollectiveSaveError(CheckpointError):
    """Another rank failed while the ranks wrote one checkpoint together; names the rank that failed first."""


class CatalogError(TrinityError):
    """Telemetry that cannot be found or queried (no run directories, a bad query)."""


class ReadOnlyViolation(CatalogError):
    """A query that would change the telemetry; `trinity sql` is read-only."""


class DataError(TrinityError, ValueError):
    """Training data that cannot be used: a source, a mix, a token store."""


class SourceError(DataError):
    """A data source that cannot be read (missing file, bad record)."""


class MixError(DataError):
    """A data mix that cannot be drawn from its sources."""


class StoreError(DataError):
    """A token store that is missing, damaged or not what the spec asks for."""


class LayoutError(TrinityError, ValueError):
    """A parallel layout that does not fit the model or the ranks it is launched on."""


class StopRequested(Exception):
    """The executor asked the node to stop (Ctrl-C, preemption, time limit)."""


class RestartRequested(Exception):
    """The node asks to end this attempt and be started again at once as a new attempt that resumes from its
    last committed checkpoint (a loss-spike rollback). Executors relaunch it (trinity.execute.attempt's
    EXIT_RESTART); the message says why."""


class Interrupted(KeyboardInterrupt):
    """The scheduler was interrupted (Ctrl-C, SIGTERM or SIGHUP); running nodes were stopped at a checkpoint."""
