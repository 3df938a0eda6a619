"""Asynchronous checkpoints: copy the state to host memory at the step boundary, write it in the background.

    saver = AsyncCheckpointer()
    waited_s = saver.submit(ckpt_root, step, state, keep_last=2)   # returns once the state is copied
    ...                                                             # training changes the state meanwhile
    saver.wait()                                                    # the save committed (or its error raised)

`submit` first waits for the save in flight (at most one: a second snapshot would double the host
memory, and a writer that cannot keep up must slow training rather than queue without bound), then
copies the state and starts a worker thread that writes and commits it through the same code as a
synchronous save (trinity.store.checkpoint.save_checkpoint, or checkpoint_dist.save_collective with
many ranks): arrays first, metadata, rename, the COMMITTED marker last. A kill at any moment leaves
the last committed checkpoint intact and, at worst, a temporary folder that pruning removes later.

The copy: on CUDA, into pinned host buffers kept from one save to the next (the same leaf, shape and
dtype reuse its buffer), with non-blocking copies and one synchronize at the end; on the CPU a clone,
since training updates parameters and optimizer states in place.

An error in the worker is kept and raised in the training thread at the next `submit` or `wait`:
never lost. With many ranks the snapshot runs the small DTensors' gathers on the training thread
(every rank at the same step), and the worker's status exchanges run on a gloo group of all ranks,
created once by the first asynchronous save (a collective: every rank makes it at the same step), so
that no collective of the worker interleaves with training's on the default group.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trinity.store.checkpoint import save_checkpoint
from trinity.store.checkpoint_commit import checkpoint_name
from trinity.store.checkpoint_dist import save_collective, snapshot_collective
from trinity.store.checkpoint_encoding import PACK_BELOW_BYTES
from trinity.store.checkpoint_zarr import Compression
from trinity.store.tree import flatten, unflatten


class AsyncCheckpointer:
    """Checkpoints written by a background thread, at most one in flight (see the module docstring)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: Path | None = None
        self._pinned: dict[str, torch.Tensor] = {}  # leaf path -> pinned host buffer (CUDA leaves only)
        self._group: dist.ProcessGroup | None = None
        self.snapshot_s = 0.0
        """Seconds the last `submit` spent copying the state to host memory."""
        self.waited_s = 0.0
        """Seconds the last `submit` waited for the save before it to finish."""

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(
        self,
        ckpt_root: Path,
        step: int,
        state: dict[str, Any],
        keep_last: int,
        meta: dict[str, Any] | None = None,
        *,
        keep_every: int | None = None,
        protected: frozenset[int] = frozenset(),
        compression: Compression = "none",
        pack_below_bytes: int | None = None,
        fsync: bool = True,
    ) -> float:
        """Wait for the save in flight (raising its error, if any), copy `state` to host memory and start
        writing it as checkpoint `step` of `ckpt_root` (arguments as save_checkpoint's). Returns the
        seconds spent waiting for the previous save: how long training was blocked beyond the copy."""
        t0 = time.perf_counter()
        self.wait()
        self.waited_s = waited = time.perf_counter() - t0
        t1 = time.perf_counter()
        job: Callable[[], Path]
        kwargs: dict[str, Any] = dict(
            keep_every=keep_every, protected=protected, compression=compression, fsync=fsync,
        )  # fmt: skip
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self._group is None:
                self._group = dist.new_group(backend="gloo")  # once, on every rank, from the training thread
            pack = PACK_BELOW_BYTES if pack_below_bytes is None else pack_below_bytes  # save_collective's default
            snapshot = snapshot_collective(state, self._copy, pack)
            self._synchronize()
            job = functools.partial(
                save_collective, ckpt_root, step, {}, keep_last, meta, snapshot=snapshot, group=self._group,
                pack_below_bytes=pack, **kwargs,
            )  # fmt: skip
        else:
            skeleton, leaves = flatten(state)
            host = unflatten(skeleton, [self._copy_leaf(leaf.path, leaf.value) for leaf in leaves])
            self._synchronize()
            job = functools.partial(
                save_checkpoint, ckpt_root, step, host, keep_last, meta, distributed=False,
                pack_below_bytes=pack_below_bytes, **kwargs,
            )  # fmt: skip
        self.snapshot_s = time.perf_counter() - t1
        self._done = None
        self._thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        return waited

    def wait(self) -> Path | None:
        """Block until the save in flight is committed; raise its error if it failed. Returns the path of
        the last save committed since the previous wait (None if there was none)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        done, self._done = self._done, None
        return done

    # -- the worker ---------------------------------------------------------------------------------
    def _run(self, job: Callable[[], Path]) -> None:
        try:
            self._done = job()
        except BaseException as exc:  # kept for the training thread: never lost
            self._error = exc

    # -- the host copy ------------------------------------------------------------------------------
    def _copy_leaf(self, path: str, value: torch.Tensor | np.ndarray[Any, Any]) -> torch.Tensor | np.ndarray[Any, Any]:
        if isinstance(value, DTensor):  # a one-rank mesh: whole here, so the worker runs no collective
            with torch.no_grad():
                value = value.full_tensor()
        return self._copy(path, value) if isinstance(value, torch.Tensor) else np.array(value, copy=True)

    def _copy(self, path: str, t: torch.Tensor) -> torch.Tensor:
        """`t` in host memory, not sharing storage with anything training will change."""
        t = t.detach()
        if t.device.type != "cuda":
            return t.clone()
        buffer = self._pinned.get(path)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._pinned[path] = buffer
        buffer.copy_(t, non_blocking=True)
        return buffer

    def _synchronize(self) -> None:
        """The non-blocking device-to-host copies are complete (one synchronize for all of them)."""
        if self._pinned and torch.cuda.is_available():
            torch.cuda.synchronize()


def checkpoint_path(ckpt_root: Path, step: int) -> Path:
    """Where checkpoint `step` is committed (known before an asynchronous save finishes)."""
    return Path(ckpt_root) / checkpoint_name(step)
