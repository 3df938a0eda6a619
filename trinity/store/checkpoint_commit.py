"""The commit protocol of checkpoints: a checkpoint exists once its COMMITTED marker is written.

    ckpt_root/step-00000100/              a checkpoint: its Zarr group, and
      COMMITTED                           the commit marker: {step, time, n_arrays, n_leaves, nbytes,
                                          skeleton_sha256, checksum: "sha256", files: {relative path:
                                          [size, sha256]} of every other file} (a plain file: zarr's
                                          member listing warns that it is not a Zarr node; checksums:
                                          trinity.store.checkpoint_integrity; markers without `files`
                                          are older and are checked structurally only)
    ckpt_root/.tmp-step-00000100-<pid>/   a checkpoint being written by process <pid>
    ckpt_root/.trash-step-00000100-<pid>/ a committed checkpoint being replaced by the same step
    ckpt_root/step-00000100.damaged/      a committed checkpoint a resume found damaged, set aside
                                          (`set_aside`): not listed, never pruned, kept for the user
                                          to inspect (`trinity verify` notes it) and delete

Protocol (a checkpoint without its marker does not exist):
1. the writer puts everything into the temporary folder, arrays first, the skeleton attribute
   last, and fsyncs every file and the folder (trinity.store.checkpoint, .checkpoint_dist);
2. `commit` renames the folder to step-00000100 (atomic) and fsyncs ckpt_root;
3. `commit` writes COMMITTED (fsync the file and the folder);
4. `prune_checkpoints`: committed checkpoints the retention policy does not keep (it keeps the
   newest committed always, the last `keep_last`, every multiple of `keep_every`, and the steps still
   referenced downstream: `retained_steps`), marker-less step folders and scratch folders of
   writers that are gone (same host: pid not alive; another host: untouched for `stale_after_s`).
   Deletion removes the marker first.
A failure in 1 removes the temporary folder; earlier checkpoints are never touched before 3.
A checkpoint found damaged when resuming is renamed aside (`set_aside`), marker and all, so that
neither a later resume nor pruning nor a new save of the same step touches it.

The step of a listed checkpoint is the one its marker records; a step folder without a marker
has only its name to tell.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from trinity.errors import CheckpointError
from trinity.run.layout import fsync_path

MARKER = "COMMITTED"
WRITER_ATTR = "trinity_writer"
"""The root group attribute {host, pid} of the process writing a folder, written first."""

_STEP_RE = re.compile(r"^step-(\d{8,})$")
_SCRATCH_RE = re.compile(r"^\.(?:tmp|trash)-step-(\d+)-(\d+)$")
_DAMAGED_RE = re.compile(r"^step-(\d{8,})\.damaged(?:-\d+)?$")
# Folders this process is writing right now: never stale, whatever their pid says.
_active: set[Path] = set()
_active_lock = threading.Lock()


class StepFolder(NamedTuple):
    """A step-* folder under a checkpoint root: a checkpoint if `committed`, else debris or one being
    written. `step` is the step its marker records (its name's step when it has no marker)."""

    step: int
    path: Path
    committed: bool


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def temporary_name(step: int) -> str:
    """The folder this process writes checkpoint `step` into before committing it."""
    return f".tmp-{checkpoint_name(step)}-{os.getpid()}"


def writer_record() -> dict[str, Any]:
    """Who writes a folder (its WRITER_ATTR), so that pruning can tell whether the writer is alive."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@contextlib.contextmanager
def claimed(folder: Path) -> Iterator[None]:
    """While this runs, pruning in this process treats `folder` as being written, whatever it holds."""
    with _active_lock:
        _active.add(folder)
    try:
        yield
    finally:
        with _active_lock:
            _active.discard(folder)


# --------------------------------------------------------------------------------------------
# Durable writes, the marker, the commit


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the deepest first."""
    for dirpath, _, files in os.walk(folder, topdown=False):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def _write_json_durable(path: Path, value: Any) -> None:
    """Write, fsync, rename into place, fsync the folder: the file is whole or absent, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def skeleton_digest(skeleton: Any, records: list[dict[str, Any]]) -> str:
    """What the marker records of the skeleton attribute, so that a load can tell they belong together."""
    return hashlib.sha256(json.dumps([skeleton, records], sort_keys=True).encode()).hexdigest()


def marker_summary(skeleton: Any, records: list[dict[str, Any]], n_arrays: int, nbytes: int) -> dict[str, Any]:
    """The marker's description of the checkpoint (all but its step and time)."""
    return {
        "n_arrays": n_arrays,
        "n_leaves": len(records),
        "nbytes": nbytes,
        "skeleton_sha256": skeleton_digest(skeleton, records),
    }


def commit(ckpt_root: Path, step: int, tmp: Path, summary: dict[str, Any]) -> Path:
    """Rename the finished `tmp` to its step folder and write the marker (steps 2 and 3 of the protocol)."""
    final = ckpt_root / checkpoint_name(step)
    trash: Path | None = None
    if final.exists():
        # Same step again (e.g. the final save lands on a periodic one). A committed copy is moved
        # aside and deleted after the new commit; a crash in between leaves the previous step as latest.
        trash = ckpt_root / f".trash-{checkpoint_name(step)}-{os.getpid()}"
        _unmark(final)
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_path(ckpt_root)
    _write_json_durable(final / MARKER, {"step": step, "time": time.time(), **summary})
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def read_marker(path: Path) -> dict[str, Any]:
    """The commit marker of a checkpoint; a clear error if it has none (it does not exist)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(
            f"{path} is not a committed checkpoint (no {MARKER} marker: it was cut short while being "
            f"written). Use trinity.store.checkpoint_commit.latest_checkpoint() to find the newest committed one."
        )
    try:
        value = json.loads(marker.read_text())
        int(value["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint damaged: {marker} cannot be read ({exc})") from None
    assert isinstance(value, dict)
    return value


def _unmark(folder: Path) -> None:
    """Uncommit first, so a deletion cut short never leaves a committed, half-deleted checkpoint."""
    (folder / MARKER).unlink(missing_ok=True)
    fsync_path(folder)


# --------------------------------------------------------------------------------------------
# Finding, pruning


def _committed_step(folder: Path) -> int | None:
    """The step `folder`'s marker records; None without a marker (also one removed while we look)."""
    try:
        text = (folder / MARKER).read_text()
    except FileNotFoundError:
        return None
    try:
        return int(json.loads(text)["step"])
    except (ValueError, KeyError, TypeError):
        # A damaged marker still marks a committed checkpoint: loading it raises CheckpointError,
        # so a resume falls back and `trinity verify` reports it. Its name tells the step.
        m = _STEP_RE.match(folder.name)
        return int(m.group(1)) if m else None


def list_checkpoints(ckpt_root: Path) -> list[StepFolder]:
    """Every step-* folder, oldest first; temporary folders are not listed."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            step = _committed_step(p)
            out.append(StepFolder(int(m.group(1)), p, False) if step is None else StepFolder(step, p, True))
    return sorted(out, key=lambda c: c.step)


def latest_committed(ckpt_root: Path) -> StepFolder | None:
    """The newest committed checkpoint, or None."""
    committed = [c for c in list_checkpoints(ckpt_root) if c.committed]
    return committed[-1] if committed else None


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The folder of the newest committed checkpoint, or None."""
    latest = latest_committed(ckpt_root)
    return None if latest is None else latest.path


def _writer_gone(folder: Path, pid_hint: int | None, stale_after_s: float) -> bool:
    """Whether the process that wrote `folder` is finished (so the folder is garbage)."""
    with _active_lock:
        if folder in _active:
            return False
    host: str
    pid: int | None
    try:
        writer = json.loads((folder / "zarr.json").read_text())["attributes"][WRITER_ATTR]
        host, pid = str(writer["host"]), int(writer["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        host, pid = socket.gethostname(), pid_hint
    if host == socket.gethostname() and pid is not None:
        if pid == os.getpid():
            return True  # ours, but not being written now (checked above)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
        else:
            return False
    # Another host (shared file system), or no way to tell: judge by the last write inside.
    newest = max((Path(d).stat().st_mtime for d, _, _ in os.walk(folder)), default=0.0)
    for d, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                newest = max(newest, (Path(d) / f).stat().st_mtime)
    return time.time() - newest > stale_after_s


def retained_steps(
    steps: list[int], keep_last: int, *, keep_every: int | None = None, protected: frozenset[int] = frozenset()
) -> set[int]:
    """Which of the committed `steps` the retention policy keeps: the newest always, the `keep_last`
    newest (keep_last <= 0: all), every step that is a multiple of `keep_every`, every step in `protected`
    (checkpoints an eval or a downstream node still references)."""
    ordered = sorted(steps)
    if keep_last <= 0:
        return set(ordered)
    kept = set(ordered[-max(1, keep_last) :])
    kept |= {s for s in ordered if (keep_every is not None and s % keep_every == 0) or s in protected}
    return kept


def prune_checkpoints(
    ckpt_root: Path,
    keep_last: int,
    *,
    keep_every: int | None = None,
    protected: frozenset[int] = frozenset(),
    stale_after_s: float = 3600.0,
) -> list[Path]:
    """Delete the committed checkpoints the retention policy does not keep (`retained_steps`: never the
    newest), and leftovers of writers that are gone (never a folder being written). Returns what was deleted."""
    root = Path(ckpt_root)
    removed: list[Path] = []
    entries = list_checkpoints(root)
    committed = [c for c in entries if c.committed]
    kept = retained_steps([c.step for c in committed], keep_last, keep_every=keep_every, protected=protected)
    doomed = [c.path for c in committed if c.step not in kept]
    for p in doomed:
        _unmark(p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for c in entries:
        if not c.committed and _writer_gone(c.path, None, stale_after_s):
            shutil.rmtree(c.path, ignore_errors=True)
            removed.append(c.path)
    if root.is_dir():
        for p in root.iterdir():
            m = _SCRATCH_RE.match(p.name)
            if m and p.is_dir() and _writer_gone(p, int(m.group(2)), stale_after_s):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def set_aside(folder: Path) -> Path:
    """Rename a damaged committed checkpoint to step-XXXXXXXX.damaged (-1, -2... if taken): out of every
    listing, never pruned, never replaced by a new save of its step; returns the new path."""
    aside = folder.with_name(f"{folder.name}.damaged")
    n = 0
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.damaged-{n}")
    os.rename(folder, aside)
    fsync_path(folder.parent)
    return aside


def list_set_aside(ckpt_root: Path) -> list[Path]:
    """The checkpoints set aside as damaged under `ckpt_root` (`set_aside`), by name."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _DAMAGED_RE.match(p.name) and p.is_dir())
