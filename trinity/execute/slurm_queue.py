"""Where a run's Slurm jobs stand, asked with a time limit on every call, and which pending jobs never start.

`query_jobs` asks `squeue` (the controller: state and pending reason of every job it still holds) and,
for jobs it no longer holds, `sacct` (the accounting database); each call has a timeout, and a call
that fails or times out answers None instead of raising, so a watcher polls again. submitit's own
`job.state` is not used: it calls sacct without a timeout.

A job pending for a reason in `NEVER_REASONS` (or a per-job/per-node limit, `never_starts`) cannot
start until the job or the cluster's configuration changes: the watcher fails its node with the
reason and cancels it (`scancel_jobs`), and Slurm cancels its dependants. The list follows Slurm's
job reason codes (slurm.schedmd.com/job_reason_codes.html); reasons that clear by themselves
(Resources, Priority, Dependency, BeginTime, ReqNodeNotAvail, PartitionDown, aggregate limits such as
AssocGrp* and Max*PerAccount) are not in it.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

QUERY_TIMEOUT_S = 30.0
CHUNK = 200
"""Job ids per squeue/sacct call."""

NEVER_REASONS: dict[str, str] = {
    "PartitionConfig": "the job asks for more than any node of its partition has (CPUs, memory, GPUs, tasks)",
    "PartitionNodeLimit": "the job asks for more nodes than its partition allows",
    "PartitionTimeLimit": "the job's time limit exceeds its partition's",
    "BadConstraints": "no node has the features or resources the job requires",
    "InvalidAccount": "the job's account is invalid",
    "InvalidQOS": "the job's QOS is invalid",
    "AccountNotAllowed": "the job's account may not use its partition",
    "QOSNotAllowed": "the job's QOS may not be used with its partition or account",
    "MaxMemPerLimit": "the job's memory exceeds the per-CPU or per-node memory limit",
    "DependencyNeverSatisfied": "a job it depends on failed or was cancelled",
}
"""Pending reasons that never clear by themselves, with what they mean (Slurm's job reason codes)."""
_PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*Per(Job|Node)\w*$|^QOSMin\w+$")
"""A per-job or per-node maximum (or QOS minimum) of the job's QOS or association: no other job has to end first."""


@dataclass(frozen=True)
class JobState:
    """A job as Slurm reports it: its state (first word, e.g. PENDING, RUNNING, CANCELLED) and, pending, why."""

    state: str
    reason: str = "None"


def never_starts(reason: str) -> bool:
    """Whether a job pending for `reason` cannot start without a change to the job or the cluster."""
    return reason in NEVER_REASONS or bool(_PER_JOB_LIMIT.match(reason))


def explain_reason(reason: str) -> str:
    return NEVER_REASONS.get(reason) or "a per-job limit of the job's QOS or association that the job exceeds"


def expand_ids(job_id: str) -> list[str]:
    """Array tasks in sacct's compressed form, e.g. '120_[0-2,5%4]' -> 120_0, 120_1, 120_2, 120_5."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    base, spec = match.group(1), match.group(2).split("%")[0]
    ids = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def query_jobs(job_ids: Iterable[str], timeout_s: float = QUERY_TIMEOUT_S) -> dict[str, JobState] | None:
    """State (and pending reason) of each job Slurm knows; None when squeue or sacct did not answer.

    A job in neither (just submitted, or already purged from accounting) is absent from the answer."""
    wanted = list(dict.fromkeys(job_ids))
    found: dict[str, JobState] = {}
    for part in _chunks(wanted):
        done = _run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%r", "-j", ",".join(part)], timeout_s)
        if done is None:
            return None
        if done.returncode != 0:
            if "Invalid job id" not in done.stderr:  # every id of the call has left the controller: not a failure
                return None
            continue
        for line in done.stdout.splitlines():
            cols = line.strip().split("|")
            if len(cols) == 3:
                found[cols[0]] = JobState(cols[1].split()[0].upper(), cols[2])
    missing = [j for j in wanted if j not in found]
    for part in _chunks(missing):
        done = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(part)], timeout_s)
        if done is None or done.returncode != 0:
            return None
        for line in done.stdout.splitlines():
            cols = line.strip().split("|")
            if len(cols) == 2 and cols[1].strip():
                for job_id in expand_ids(cols[0]):
                    found.setdefault(job_id, JobState(cols[1].split()[0].upper()))
    return {j: found[j] for j in wanted if j in found}


def scancel_jobs(job_ids: list[str], timeout_s: float = QUERY_TIMEOUT_S) -> str | None:
    """scancel, bounded; returns what went wrong (None: Slurm accepted it)."""
    if not job_ids:
        return None
    done = _run(["scancel", *job_ids], timeout_s)
    if done is None:
        return f"scancel {' '.join(job_ids)} did not answer within {timeout_s:.0f} s"
    if done.returncode != 0:
        return f"scancel {' '.join(job_ids)} failed: {done.stderr.strip()[:300]}"
    return None
