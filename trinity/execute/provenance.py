"""Provenance of an attempt: which code, libraries and hosts it ran on, and whether that changed.

A run lasts weeks and is resumed many times; a resumed attempt may run other code than the attempts
whose checkpoints it continues (a `git pull`, an edited file, a new torch). Every attempt's rank 0
records, at the start of its body (trinity.execute.attempt), a flat dict in its attempt record
(AttemptRecord.provenance; the catalog's `attempts` table has a typed column per key):

    trinity_version   trinity.__version__
    git_commit        HEAD of the git checkout trinity runs from (None: not a checkout, see git_note)
    git_dirty         sha256 of the package's uncommitted changes: `git diff HEAD --binary` under the
                      package plus the names and bytes of its untracked (not ignored) files; None when clean
    git_note          why git_commit is None (not a checkout, git missing, git timed out), else None
    python            platform.python_version()
    torch             torch's version (read without importing torch: a tokenizer node never loads it)
    cuda              torch.version.cuda (None: a CPU build)
    hosts             every rank's host name, by rank (all_gather_object when the node has several ranks)
    packages_sha256   sha256 over the sorted `name==version` lines of the installed distributions

Only the package's own files count as "the code": a changed README or test does not change what a
node computes, and the spec is in the node's identity already. Collecting costs about 0.2 s (the
package list dominates); git runs with a timeout and never fails the node.

`code_changes` compares a node's latest attempt with its earlier ones on CODE_KEYS, the keys that
change what the node computes (python, cuda and hosts are shown, but a different host or interpreter
patch release is not reported as other code). `trinity status` warns about it; `trinity explain` shows it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import runpy
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trinity
from trinity.run.status import AttemptRecord

GIT_TIMEOUT_S = 5.0
"""Each git command gets this long (a checkout on a hung network file system must not hold the node)."""
KEYS = (
    "trinity_version",
    "git_commit",
    "git_dirty",
    "git_note",
    "python",
    "torch",
    "cuda",
    "hosts",
    "packages_sha256",
)
"""The keys of a provenance dict, in the order they are shown."""
CODE_KEYS = ("git_commit", "git_dirty", "trinity_version", "torch", "packages_sha256")
"""Keys whose difference between two attempts means they ran other code."""


def package_dir() -> Path:
    """The folder of the trinity package this process imported."""
    return Path(trinity.__file__).resolve().parent


def _git(args: Sequence[str], cwd: Path) -> bytes:
    """stdout of `git ARGS` in `cwd`; raises OSError, CalledProcessError or TimeoutExpired."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # read only: never take the index lock
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):  # the checkout is where the package lies
        env.pop(name, None)
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        timeout=GIT_TIMEOUT_S,
        env=env,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return done.stdout


def git_state(package: Path) -> tuple[str | None, str | None, str | None]:
    """(commit, dirty hash, note) of the git checkout holding `package`; commit None with a note that says why."""
    try:
        top = _git(["rev-parse", "--show-toplevel"], package).decode().strip()
        tracked = _git(["ls-files", "--", "__init__.py"], package).strip()
        if not tracked:
            return None, None, f"{package} is not tracked by the git checkout at {top}"
        commit = _git(["rev-parse", "HEAD"], package).decode().strip()
        digest = hashlib.sha256()
        diff = _git(["diff", "HEAD", "--binary", "--no-ext-diff", "--", "."], package)
        digest.update(diff)
        untracked = _git(["ls-files", "--others", "--exclude-standard", "-z", "--", "."], package)
        names = sorted(n for n in untracked.split(b"\0") if n)
        for name in names:
            digest.update(b"\0untracked\0" + name + b"\0")
            path = package / name.decode(errors="surrogateescape")
            if path.is_file():
                digest.update(path.read_bytes())
    except FileNotFoundError:
        return None, None, "git is not installed"
    except subprocess.TimeoutExpired:
        return None, None, f"git did not answer within {GIT_TIMEOUT_S:g} s"
    except subprocess.CalledProcessError as exc:
        first = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        return None, None, f"not a git checkout ({first[0] if first else f'git exit {exc.returncode}'})"
    except OSError as exc:
        return None, None, f"git could not be run ({exc})"
    return commit, (digest.hexdigest() if diff or names else None), None


def torch_versions() -> tuple[str | None, str | None]:
    """(torch version, CUDA version or None) without importing torch when it is not loaded yet."""
    loaded = sys.modules.get("torch")
    if loaded is not None:
        return str(loaded.__version__), loaded.version.cuda
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    try:  # torch/version.py is a few assignments, generated by torch's build
        values = runpy.run_path(str(Path(next(iter(spec.submodule_search_locations))) / "version.py"))
    except Exception:
        return importlib.metadata.version("torch"), None
    cuda = values.get("cuda")
    return str(values.get("__version__")), (str(cuda) if cuda is not None else None)


def packages_sha256() -> str:
    """sha256 over the sorted, distinct `name==version` lines of every installed distribution."""
    lines = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            lines.add(f"{name.lower().replace('_', '-')}=={dist.version}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def collect(package: Path | None = None, hosts: list[str] | None = None) -> dict[str, Any]:
    """This process's provenance (see the module docstring); `hosts` defaults to this host alone. Never raises
    on git; the package list and versions come from the running interpreter."""
    commit, dirty, note = git_state(package or package_dir())
    torch_version, cuda = torch_versions()
    return {
        "trinity_version": trinity.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "git_note": note,
        "python": platform.python_version(),
        "torch": torch_version,
        "cuda": cuda,
        "hosts": hosts if hosts is not None else [socket.gethostname()],
        "packages_sha256": packages_sha256(),
    }


def gather_hosts(world_size: int) -> list[str]:
    """Every rank's host name, by rank; all ranks must call it (a collective when world_size > 1)."""
    host = socket.gethostname()
    if world_size <= 1:
        return [host]
    import torch.distributed as dist

    hosts: list[Any] = [None] * world_size
    dist.all_gather_object(hosts, host)
    return [str(h) for h in hosts]


@dataclass(frozen=True)
class Difference:
    """How an earlier attempt's code differs from the latest attempt's."""

    earlier: int
    """The earlier attempt's number."""
    keys: dict[str, tuple[Any, Any]]
    """CODE_KEYS that differ: (the earlier attempt's value, the latest attempt's value)."""


@dataclass(frozen=True)
class CodeChange:
    """A node whose latest attempt (with provenance) ran other code than some earlier attempts."""

    node: str
    attempt: int
    differences: list[Difference]

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "attempt": self.attempt,
            "message": self.line(),
            "differs_from": [
                {"attempt": d.earlier, "keys": {k: {"before": b, "after": a} for k, (b, a) in d.keys.items()}}
                for d in self.differences
            ],
        }

    def line(self) -> str:
        """One line for `trinity status`: the node, the attempts and what differs."""
        parts = [f"attempt {d.earlier} ({', '.join(d.keys)})" for d in self.differences]
        return f"{self.node}: attempt {self.attempt} ran other code than {'; '.join(parts)}"


def differences(earlier: dict[str, Any], latest: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The CODE_KEYS whose values differ between two provenance dicts."""
    return {k: (earlier.get(k), latest.get(k)) for k in CODE_KEYS if earlier.get(k) != latest.get(k)}


def code_changes(node: str, attempts: Sequence[AttemptRecord]) -> CodeChange | None:
    """How the latest attempt that recorded provenance differs from the earlier ones (None: it does not, or
    fewer than two attempts recorded it: a reused attempt or one that never reached its body records none)."""
    recorded = [a for a in attempts if isinstance(a.provenance, dict)]
    if len(recorded) < 2:
        return None
    latest = recorded[-1]
    assert latest.provenance is not None
    found = []
    for a in recorded[:-1]:
        assert a.provenance is not None
        keys = differences(a.provenance, latest.provenance)
        if keys:
            found.append(Difference(a.attempt, keys))
    return CodeChange(node, latest.attempt, found) if found else None


def _short(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if key in ("git_commit", "git_dirty", "packages_sha256") and isinstance(value, str):
        return value[:12]
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def describe(provenance: dict[str, Any]) -> str:
    """One line: what an attempt ran (commit and uncommitted changes, versions, hosts, package set)."""
    if provenance.get("git_commit") is None:
        git = f"no git commit ({provenance.get('git_note') or 'not recorded'})"
    else:
        git = f"git {_short('git_commit', provenance['git_commit'])}"
        dirty = provenance.get("git_dirty")
        git += f" with uncommitted changes {_short('git_dirty', dirty)}" if dirty else " (clean)"
    cuda = provenance.get("cuda")
    return (
        f"trinity {provenance.get('trinity_version')}, {git}, python {provenance.get('python')}, "
        f"torch {provenance.get('torch')} ({f'CUDA {cuda}' if cuda else 'no CUDA'}), "
        f"hosts {_short('hosts', provenance.get('hosts'))}, "
        f"packages {_short('packages_sha256', provenance.get('packages_sha256'))}"
    )


def explain_lines(node: str, attempts: Sequence[AttemptRecord]) -> list[str]:
    """`trinity explain`: the latest attempt's provenance, then how each earlier attempt's code differs."""
    recorded = [a for a in attempts if isinstance(a.provenance, dict)]
    if not recorded:
        return [f"{node}: no attempt recorded its provenance (none reached its body, or they predate provenance)"]
    latest = recorded[-1]
    assert latest.provenance is not None
    lines = [f"attempt {latest.attempt} ran: {describe(latest.provenance)}"]
    change = code_changes(node, recorded)
    for d in change.differences if change is not None else []:
        what = "; ".join(f"{k} {_short(k, b)} -> {_short(k, a)}" for k, (b, a) in d.keys.items())
        lines.append(f"attempt {d.earlier} ran other code: {what}")
    if len(recorded) > 1 and change is None:
        earlier = ", ".join(str(a.attempt) for a in recorded[:-1])
        lines.append(f"earlier attempts ({earlier}) ran the same code")
    return lines
