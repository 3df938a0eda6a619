"""Run a function on N local CPU processes joined in a gloo process group (tests and small benchmarks).

    results = run_workers(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on ranks 0 and 1

`fn` must be importable by name (a module-level function: the workers are spawned, not forked).
Each worker sets torch to one thread, joins the default process group through a TCP store on
127.0.0.1 (its free port chosen by the OS, so parallel launches never collide), runs `fn`, and
sends back the pickled return value. The first failing rank's traceback is raised here as a
RuntimeError (naming any rank that crashed outright, often the cause) and the other workers are
killed; a rank that dies without a result raises a RuntimeError, a launch that exceeds
`timeout_s` a TimeoutError.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

HOST = "127.0.0.1"


def _worker(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))  # type: ignore[attr-defined]
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        value = fn(rank, world_size, *args)
        # Plain pickle (not the multiprocessing one, which would pass tensors as shared memory
        # that dies with this process): the parent gets a self-contained copy.
        results.put((rank, True, pickle.dumps(value)))
        dist.barrier()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _crashed(procs: list[Any], reported: dict[int, Any]) -> str:
    """'rank r exited with code c without a result' for ranks that died without reporting ('' if none)."""
    dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in reported]
    return ", ".join(f"rank {r} exited with code {code} without a result" for r, code in dead)


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 180.0) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` spawned gloo ranks; their return values, by rank."""
    if world_size < 1:
        raise ValueError(f"world_size = {world_size} must be >= 1")
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False)  # type: ignore[attr-defined]
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, store.port, timeout_s, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    name = getattr(fn, "__qualname__", repr(fn))
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:  # nothing yet: check for crashed ranks and the deadline
                crashed = _crashed(procs, got)
                if crashed and results.empty():
                    raise RuntimeError(f"{name}: {crashed} (of {world_size} ranks)") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(got))
                    raise TimeoutError(
                        f"{name}: ranks {missing} of {world_size} gave no result within {timeout_s} s"
                    ) from None
                continue
            if not ok:
                time.sleep(1.0)  # a rank that crashed outright is often the cause of this one's error
                crashed = _crashed(procs, {**got, rank: None})
                also = f"\nMeanwhile {crashed}." if crashed else ""
                raise RuntimeError(f"{name}: rank {rank} of {world_size} failed:\n{payload}{also}")
            got[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [got[r] for r in range(world_size)]
