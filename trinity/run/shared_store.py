"""A store shared across runs (`execution.store`): node outputs addressed by node identity.

    STORE/nodes/
      <identity>/                   one committed entry per node identity (hex, as graph/compile hashes it)
        entry.json                  identity, kind, node id, producing run (dir, id), time, trinity version,
                                    and every file it holds with its size
        outputs/                    the node's outputs folder
        checkpoints/step-XXXXXXXX/  training kinds: the final checkpoint that outputs/final.json names
        COMMITTED                   written last, before the entry is renamed into place
      <identity>.tmp-<pid>          an entry being written; renamed to <identity> once whole
      <identity>.lease              who is producing that identity now (see `StoreLease`)
      <identity>.damaged-<time>     a damaged entry a later publish set aside (never deleted)

Why: a node's identity hashes everything that changes its result, so a second run whose node has an
identity the store holds can take that output instead of computing it again (a tokenizer, a phase's
tokenized store). Nothing is copied: an entry's files are hard links to the producing run's files, and
a reusing run's node folder gets hard links to the entry's (a file's data exists once on the
filesystem whoever deletes what). Only when hard links fail (another filesystem) are files copied,
and the caller is told so. Symbolic links are never used: a run directory refuses paths that resolve
outside it (trinity.run.layout).

An entry is reused only when it is whole: its COMMITTED marker exists, entry.json names the identity
it is filed under, and every file it lists is there with its size. Anything else is treated as absent,
with the reason (`find`), and a later publish sets it aside.

Two runs producing one identity at once do not both compute it: the producer holds a lease,
`<identity>.lease`, created atomically and exclusively (a complete file hard-linked into place, the
O_CREAT|O_EXCL of a file that is never seen half-written), holding its owner (host, pid, process start
time, run dir, node id) and kept fresh by touching its mtime every heartbeat period. A lease is stale
when its mtime is older than STALE_PERIODS periods, or its owner is on this host and its process is
gone. `claim` waits for a live owner, reuses what it commits, and takes over a stale lease or one
released without a commit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trinity
from trinity.errors import RunError
from trinity.run.layout import NodeDir, atomic_write_json, fsync_path, path_inside, read_json
from trinity.run.status import STALE_PERIODS, now_iso, process_alive, process_start

ENTRY = "entry.json"
MARKER = "COMMITTED"
IDENTITY_RE = re.compile(r"^[0-9a-f]{16,128}$")
"""What a node identity looks like (graph/compile: a sha256 hex digest); nothing else becomes a path."""
LINK_FAILURES = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES)
"""Errors of os.link that mean 'not here' (another filesystem, a filesystem without hard links): copy instead."""


def check_identity(identity: str) -> str:
    if not IDENTITY_RE.match(identity):
        raise RunError(f"{identity!r} is not a node identity (hex digits); refusing to use it as a store path")
    return identity


@dataclass(frozen=True)
class Found:
    """What the store holds for an identity: `path` of its entry (None: nothing there), and `problem`
    (None: a whole, committed entry that can be reused; otherwise why it cannot)."""

    path: Path | None
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.path is not None and self.problem is None


@dataclass(frozen=True)
class Placed:
    """How files were put in place: `copied` says why they were copied rather than linked (None: all linked)."""

    path: Path
    copied: str | None = None
    dropped: bool = False
    """Publish only: another run committed this identity first; this publish was dropped."""

    @property
    def note(self) -> str:
        return f" (copied, not linked: {self.copied})" if self.copied else ""


@dataclass(frozen=True)
class SharedStore:
    """The store at `root` (an absolute path)."""

    root: Path

    @classmethod
    def of(cls, setting: str | None, cwd: Path | None = None) -> SharedStore | None:
        """The store `execution.store` names (relative to `cwd`, default the working directory), or None."""
        if not setting:
            return None
        return cls(((cwd or Path.cwd()) / Path(setting).expanduser()).resolve())

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    def entry(self, identity: str) -> Path:
        return self.nodes / check_identity(identity)

    def lease_file(self, identity: str) -> Path:
        return self.nodes / f"{check_identity(identity)}.lease"

    # -- reading ---------------------------------------------------------------------------------

    def find(self, identity: str) -> Found:
        """The entry of `identity` and whether it can be reused (see the module docstring). Never raises."""
        path = self.entry(identity)
        if not path.exists():
            return Found(None)
        return Found(path, entry_problem(path, identity))

    # -- writing ---------------------------------------------------------------------------------

    def publish(
        self, node_dir: NodeDir, *, identity: str, kind: str, node_id: str, run_root: Path, run_id: str
    ) -> Placed:
        """Commit `node_dir`'s outputs (and the final checkpoint outputs/final.json names) as the entry of
        `identity`: hard links into `<identity>.tmp-<pid>`, entry.json, COMMITTED, then one rename. An entry
        already committed wins (this one is dropped); a damaged one is set aside first. Raises OSError or
        RunError on failure (the caller warns: publishing never fails a node)."""
        final = self.entry(identity)
        if self.find(identity).usable:
            return Placed(final, dropped=True)
        files = _published_files(node_dir)
        tmp = self.nodes / f"{identity}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            copied = _place_all([(node_dir.root / rel, tmp / rel) for rel in files])
            atomic_write_json(
                tmp / ENTRY,
                {
                    "identity": identity,
                    "kind": kind,
                    "node": node_id,
                    "run_dir": str(run_root),
                    "run_id": run_id,
                    "time": now_iso(),
                    "trinity_version": trinity.__version__,
                    "copied": copied,
                    "files": {rel: (tmp / rel).stat().st_size for rel in files},
                },
            )
            atomic_write_json(tmp / MARKER, {"identity": identity, "time": now_iso(), "files": len(files)})
            fsync_path(tmp)
            found = self.find(identity)
            if found.path is not None and found.problem is not None:
                final.rename(final.with_name(f"{identity}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"))
            try:
                tmp.rename(final)
            except OSError as exc:  # another run renamed its entry into place first
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not self.find(identity).usable:
                    raise
                return Placed(final, dropped=True)
            fsync_path(self.nodes)
            return Placed(final, copied)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def entry_problem(path: Path, identity: str) -> str | None:
    """Why the entry at `path` cannot be reused as `identity`'s (None: it can). Never raises."""
    if not (path / MARKER).is_file():
        return f"it has no {MARKER} marker (cut short while being written)"
    try:
        meta = read_json(path / ENTRY)
        if meta.get("identity") != identity:
            return f"its {ENTRY} names identity {str(meta.get('identity'))[:12]}, not {identity[:12]}"
        files = meta["files"]
        if not isinstance(files, dict) or not files:
            return f"its {ENTRY} lists no files"
        for rel, size in files.items():
            file = path_inside(path, rel)
            if not file.is_file():
                return f"{rel} is missing"
            if file.stat().st_size != size:
                return f"{rel} has {file.stat().st_size} bytes, not {size}"
    except (OSError, ValueError, KeyError, AttributeError, RunError) as exc:
        return f"its {ENTRY} cannot be read ({exc})"
    return None


def link_entry(entry: Path, node_dir: NodeDir) -> Placed:
    """Give `node_dir` the entry's outputs/ (and checkpoint) as hard links (copies where links fail).

    The node's old outputs/ (a failed attempt's partial results) are removed; a checkpoint folder of the
    same name as the entry's is renamed aside (`<name>.replaced-<time>`), never deleted."""
    files = [str(rel) for rel in read_json(entry / ENTRY)["files"]]
    if node_dir.outputs.exists():
        shutil.rmtree(node_dir.outputs)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for top in sorted({"/".join(rel.split("/")[:2]) for rel in files if rel.startswith("checkpoints/")}):
        target = node_dir.root / top
        if target.exists():
            target.rename(target.with_name(f"{target.name}.replaced-{stamp}"))
    pairs = [(path_inside(entry, rel), node_dir.root / rel) for rel in files]
    for _, dst in pairs:
        if not dst.resolve().is_relative_to(node_dir.root.resolve()):
            raise RunError(f"{entry}: {dst} would lead outside {node_dir.root}")
    return Placed(entry, _place_all(pairs))


def _published_files(node_dir: NodeDir) -> list[str]:
    """Relative paths (from the node folder) of every file of outputs/ and of the final checkpoint."""
    if not node_dir.outputs.is_dir():
        raise RunError(f"{node_dir.outputs} does not exist: nothing to publish")
    roots = [node_dir.outputs]
    final = node_dir.outputs / "final.json"
    if final.is_file():
        checkpoint = str(read_json(final)["checkpoint"])
        if not checkpoint.startswith("checkpoints/"):
            raise RunError(f"{final} names {checkpoint!r}, not a folder under checkpoints/")
        roots.append(node_dir.inside(checkpoint))
    files: list[str] = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                raise RunError(f"{path} is a symbolic link; the store holds files only")
            if path.is_file():
                files.append(path.relative_to(node_dir.root).as_posix())
    return files


def _place_all(pairs: list[tuple[Path, Path]]) -> str | None:
    """Hard-link each (src, dst); once a link fails for a reason that means 'not on this filesystem', copy the
    rest. Returns why files were copied, or None."""
    copied: str | None = None
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if copied is None:
            try:
                os.link(src, dst)
                continue
            except OSError as exc:
                if exc.errno not in LINK_FAILURES:
                    raise
                copied = f"hard links failed: {exc.strerror} ({src.parent} -> {dst.parent})"
        shutil.copy2(src, dst)
    return copied


# -- the lease of an identity being produced ------------------------------------------------------


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds `<identity>.lease` (its JSON)."""

    host: str
    pid: int
    start: int | None
    run_dir: str
    node: str
    period_s: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def me(cls, run_dir: Path, node: str, period_s: float) -> LeaseOwner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start(pid), str(run_dir), node, period_s)

    def describe(self) -> str:
        return f"{self.node} of run {self.run_dir} (pid {self.pid} on {self.host})"


def read_owner(path: Path) -> tuple[LeaseOwner, str] | None:
    """The owner of the lease at `path` and its raw text; None if there is none (or it is unreadable)."""
    try:
        text = path.read_text()
        data = json.loads(text)
        return LeaseOwner(**data), text
    except (OSError, ValueError, TypeError):
        return None


def lease_stale(path: Path, owner: LeaseOwner, now: float | None = None) -> str | None:
    """Why the lease at `path` held by `owner` is stale (None: it is live)."""
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return "released"
    if age > STALE_PERIODS * owner.period_s:
        return f"not refreshed for {age:.0f} s (period {owner.period_s:g} s)"
    if owner.host == socket.gethostname() and not process_alive(owner.pid, owner.start):
        return f"its process (pid {owner.pid} on {owner.host}) is gone"
    return None


class StoreLease:
    """The lease this process holds on an identity: refreshed (mtime) every period by a daemon thread."""

    def __init__(self, path: Path, owner: LeaseOwner) -> None:
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trinity-store-lease", daemon=True)

    @classmethod
    def try_create(cls, path: Path, owner: LeaseOwner) -> StoreLease | None:
        """Create the lease exclusively: a complete temporary file hard-linked to `path` (fails if it exists)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{owner.token}")
        tmp.write_text(json.dumps(owner.__dict__, sort_keys=True))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        lease = cls(path, owner)
        lease._thread.start()
        return lease

    def _run(self) -> None:
        while not self._stop.wait(self.owner.period_s):
            if not self.held():
                return  # taken over (we were judged stale): it is not ours to refresh
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def held(self) -> bool:
        found = read_owner(self.path)
        return found is not None and found[0].token == self.owner.token

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.held():
            self.path.unlink(missing_ok=True)


def take_over(path: Path, stale_text: str) -> bool:
    """Remove the stale lease at `path` if it is still the one read as `stale_text` (atomically: it is renamed
    to a name of our own first, so of two processes taking it over one gets it). A live lease that replaced
    it meanwhile is put back. True if the stale lease is gone (whoever removed it)."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return True
    try:
        if aside.read_text() == stale_text:
            return True
        with contextlib.suppress(FileExistsError):  # not the lease we judged: a live one created since; restore it
            os.link(aside, path)
        return False
    finally:
        aside.unlink(missing_ok=True)


@dataclass(frozen=True)
class Claim:
    """What `claim` got: a `lease` to produce the identity, or a committed `entry` to reuse, or `stopped`."""

    lease: StoreLease | None = None
    entry: Path | None = None
    waited_for: str | None = None
    """Whom it waited for ('' if nobody)."""
    stopped: bool = False


def claim(
    store: SharedStore,
    identity: str,
    owner: LeaseOwner,
    *,
    stop: Callable[[], bool] = lambda: False,
    on_wait: Callable[[str], None] = lambda message: None,
    poll_s: float = 0.5,
    on_problem: Callable[[str], None] = lambda message: None,
) -> Claim:
    """Before producing `identity`: reuse a committed entry, or take the lease (a stale one taken over), or
    wait for the live owner (`on_wait` hears whom) until it commits (reuse), releases without committing
    (take the lease and run) or goes stale. `stop()` true ends a wait as stopped."""
    path = store.lease_file(identity)
    waited: str | None = None
    told: str | None = None
    while True:
        found = store.find(identity)
        if found.usable:
            assert found.path is not None
            return Claim(entry=found.path, waited_for=waited)
        if found.problem is not None and told != found.problem:
            on_problem(f"store entry {found.path} is not reused: {found.problem}")
            told = found.problem
        lease = StoreLease.try_create(path, owner)
        if lease is not None:
            if store.find(identity).usable:  # committed between our look and our lease
                lease.release()
                continue
            return Claim(lease=lease, waited_for=waited)
        current = read_owner(path)
        if current is None:  # released (or being replaced) between our two looks: try again
            time.sleep(min(poll_s, 0.05))
            continue
        holder, text = current
        why = lease_stale(path, holder)
        if why is not None:
            on_wait(f"taking over the store lease of {holder.describe()}: {why}")
            take_over(path, text)
            continue
        if stop():
            return Claim(stopped=True, waited_for=holder.describe())
        if waited != holder.describe():
            waited = holder.describe()
            on_wait(f"waiting for {waited}, which is producing identity {identity[:12]} in the store {store.root}")
        time.sleep(poll_s)


def describe_entry(entry: Path) -> dict[str, Any]:
    """entry.json of a committed entry (for messages and events)."""
    data: dict[str, Any] = read_json(entry / ENTRY)
    return data
