"""Checkpoints in Zarr: save a state tree, load it back exactly. The entry point of the checkpoint store.

A checkpoint is one Zarr v3 group per step, ckpt_root/step-00000100/, and exists only once its
commit marker is written. The pieces:

    trinity.store.tree                  the state tree <-> a JSON skeleton and a list of leaves
    trinity.store.checkpoint_encoding   a leaf <-> its stored numpy array and record (bf16 as bits)
    trinity.store.checkpoint_zarr       the group: attributes, arrays, chunks, compression
    trinity.store.checkpoint_commit     temporary folder, atomic rename, COMMITTED marker; list,
                                        latest, prune keep-last-K (never the newest committed)
    trinity.store.checkpoint_integrity  the checksum of every file, in the marker; checked on load
    trinity.store.checkpoint_dist       the collective save of a torch.distributed job
    trinity.store.shards                where a DTensor's pieces lie, and who writes each

Many ranks (torch.distributed, FSDP2/HSDP, expert parallelism): save_checkpoint is then a
collective (trinity.store.checkpoint_dist). The checkpoint has the same layout: a DTensor leaf is
one array of its global shape, chunked so that each rank's piece is one chunk written by that rank
alone (trinity.store.shards); the skeleton attribute also records `layout` = {world_size, per
DTensor leaf: mesh shape, mesh dim names, placements, chunks} (read_checkpoint_layout). Loading
needs no collective: without `like` every leaf is whole; with `like` (the state dicts of the job
that loads, on any number of ranks) each DTensor leaf comes back in that layout, each rank reading
only its own rectangle.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from zarr.core.sync import sync

from trinity.errors import CheckpointError
from trinity.store import shards
from trinity.store.checkpoint_commit import (
    MARKER,
    checkpoint_name,
    claimed,
    commit,
    marker_summary,
    prune_checkpoints,
    read_marker,
    skeleton_digest,
    temporary_name,
)
from trinity.store.checkpoint_dist import save_collective
from trinity.store.checkpoint_encoding import (
    PACK_BELOW_BYTES,
    PACK_BELOW_BYTES_ONE_PROCESS,
    PACKED,
    StoredLeaves,
    as_tensor,
    leaf_value,
    unpacked,
)
from trinity.store.checkpoint_integrity import manifest, reading_store, verify_chunks, verify_metadata
from trinity.store.checkpoint_zarr import (
    FORMAT,
    Compression,
    Selection,
    create_group,
    fsync_unsynced,
    raw_array,
    read_arrays,
    read_attrs,
    read_raw,
    set_attrs,
    write_arrays,
)
from trinity.store.tree import Leaf, flatten, leaf_targets, unflatten

# --------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    meta: dict[str, Any] | None = None,
    *,
    compression: Compression = "none",
    pack_below_bytes: int | None = None,
    fsync: bool = True,
    stale_after_s: float = 3600.0,
    distributed: bool | None = None,
    keep_every: int | None = None,
    protected: frozenset[int] = frozenset(),
) -> Path:
    """Write and commit ckpt_root/step-{step:08d}; then keep the `keep_last` newest (keep_last <= 0: all),
    every multiple of `keep_every` and the steps in `protected` (trinity.store.checkpoint_commit.retained_steps).

    `state` is any nesting of dicts/lists/tuples of tensors, numpy arrays and Python scalars
    (see trinity.store.tree). `meta` (JSON) is stored in the checkpoint and returned by
    `read_checkpoint_meta`. An exception while writing leaves no trace: the temporary folder is
    removed and the earlier checkpoints are untouched.

    With torch.distributed initialised and more than one rank (or `distributed=True`), this is a
    collective: every rank calls it with its own tree (same structure; DTensor leaves hold each
    rank's piece, every other leaf is the same on all ranks) and gets the same path back; see
    `trinity.store.checkpoint_dist`. `distributed=False` saves from the calling process alone.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        return save_collective(
            Path(ckpt_root), step, state, keep_last, meta, compression=compression,
            pack_below_bytes=PACK_BELOW_BYTES if pack_below_bytes is None else pack_below_bytes, fsync=fsync,
            stale_after_s=stale_after_s, keep_every=keep_every,
            protected=protected,
        )  # fmt: skip
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / temporary_name(step)
    with claimed(tmp), claimed(final):
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            summary = write_tree(
                tmp, state, meta, step=step, compression=compression, pack_below_bytes=pack_below_bytes, fsync=fsync
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit(ckpt_root, step, tmp, summary)
    prune_checkpoints(ckpt_root, keep_last, keep_every=keep_every, protected=protected, stale_after_s=stale_after_s)
    return final


def write_tree(
    folder: Path,
    state: Any,
    meta: dict[str, Any] | None = None,
    *,
    step: int | None = None,
    compression: Compression = "none",
    pack_below_bytes: int | None = None,
    fsync: bool = True,
) -> dict[str, Any]:
    """Write `state` as a new Zarr group at `folder` (which must not exist); return the summary for the marker."""
    skeleton, leaves = flatten(state)
    stored = StoredLeaves(PACK_BELOW_BYTES_ONE_PROCESS if pack_below_bytes is None else pack_below_bytes)
    for leaf in leaves:
        stored.add(leaf.path, _whole_in_one_process(leaf))
    arrays = stored.arrays()
    attrs = {"format": FORMAT, "step": step, "meta": meta or {}, "skeleton": skeleton, "leaves": stored.records}

    folder.mkdir(parents=True)
    root = sync(create_group(folder))
    digests = write_arrays(folder, arrays, compression, fsync=False)  # checksummed as they are written
    sync(set_attrs(root, attrs))  # metadata last
    if fsync:  # then every file and folder at once: the disk gets them together (1.3 s, not 2.0 s, for 616 MB)
        fsync_unsynced(folder, ())
    summary = marker_summary(skeleton, stored.records, len(arrays), int(sum(a.nbytes for _, a in arrays)))
    return {**summary, **manifest(folder, known=digests)}


def _whole_in_one_process(leaf: Leaf) -> torch.Tensor | np.ndarray[Any, Any]:
    """A leaf's value for a single-process save: a DTensor on a one-rank mesh becomes its full tensor."""
    v = leaf.value
    if not shards.is_dtensor(v):
        return v
    if v.device_mesh.size() != 1:
        raise ValueError(
            f"{leaf.path}: a DTensor on a mesh of {v.device_mesh.size()} ranks needs a collective save: call "
            f"save_checkpoint on every rank (distributed=None or True), not on one"
        )
    return v.full_tensor()


# --------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: Path, *, like: Any = None, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """The state given to save_checkpoint, rebuilt exactly (tensors on CPU unless `map_location`).

    Without `like`, every leaf comes back whole: a DTensor saved by many ranks is a plain tensor of
    its global shape. `like` is (part of) a tree of the same structure in the layout wanted now,
    e.g. {"model": model.state_dict(), "optimizer": optimizer.state_dict()} of an M-rank job: each
    leaf that is a DTensor there comes back as a DTensor with that mesh and those placements (on its
    local tensor's device, with the stored dtype), and this rank reads only its own rectangle of the
    stored array. This needs no collective: each rank may load on its own. Leaves `like` lacks, or
    holds as plain values, come back as without `like`.

    Every file the load reads is checked against the checksums of its commit marker as it is read, and
    every chunk it reads must exist (trinity.store.checkpoint_integrity): a damaged checkpoint raises
    CheckpointError naming its path and the array; it never loads zeros or changed bits.
    """
    path = Path(path)
    marker = read_marker(path)
    verify_metadata(path, marker)
    attrs = read_attrs(path)
    skeleton, records = attrs["skeleton"], attrs["leaves"]
    if skeleton_digest(skeleton, records) != marker.get("skeleton_sha256"):
        raise CheckpointError(f"checkpoint damaged: {path}: the skeleton attribute does not match its {MARKER} marker")
    # Leaf index -> (its key path, the DTensor of the target layout, the rectangle this rank reads).
    targets: dict[int, tuple[str, DTensor, tuple[slice, ...]]] = {}
    if like is not None:
        for i, (where, ref) in leaf_targets(skeleton, like).items():
            if shards.is_dtensor(ref):
                if records[i]["kind"] != "tensor":
                    raise ValueError(f"{path}: {where} is stored as a numpy array; it cannot be loaded as a DTensor")
                targets[i] = (where, ref, shards.region_of(where, tuple(records[i]["shape"]), ref))
    wanted: list[tuple[str, Selection]] = []
    for i, rec in enumerate(records):
        if "array" in rec:
            wanted.append((rec["array"], targets[i][2] if i in targets else ...))
    if any("packed" in r for r in records):
        wanted.append((PACKED, ...))
    files = marker.get("files")
    if files is None:
        verify_chunks(path, marker, wanted, records)  # an older marker: every chunk present, no checksums
    arrays = _read(path, wanted, marker, records)
    leaves: list[Any] = []
    for i, rec in enumerate(records):
        if "packed" in rec:
            arr = unpacked(arrays[PACKED], rec)
            if i in targets:
                arr = arr[targets[i][2]]
        else:
            arr = arrays[rec["array"]]
        if i in targets:
            leaves.append(shards.as_dtensor(as_tensor(np.asarray(arr), rec), targets[i][1]))
        else:
            leaves.append(leaf_value(arr, rec, map_location))
    state = unflatten(skeleton, leaves)
    assert isinstance(state, dict)
    return state


def _read(
    path: Path, wanted: list[tuple[str, Selection]], marker: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, np.ndarray[Any, Any]]:
    """{array name: what `wanted` reads of it}: uncompressed arrays read by trinity.store.checkpoint_zarr
    straight into their destination, compressed ones by zarr-python through the verifying store; every
    file checked against the marker's checksums as it is read."""
    files, algorithm = marker.get("files"), marker.get("checksum", "sha256")
    raw = {name: raw_array(path, name, files, algorithm) for name, _ in wanted}
    fast = [(name, sel) for name, sel in wanted if raw[name] is not None]
    slow = [(name, sel) for name, sel in wanted if raw[name] is None]
    out = dict(zip([n for n, _ in fast], read_raw(path, [(raw[n], s) for n, s in fast], files, algorithm), strict=True))  # type: ignore[misc]
    if slow:
        store = reading_store(path, marker, records)  # with checksums: each file checked as it is read
        out.update(zip([n for n, _ in slow], sync(read_arrays(path, slow, store)), strict=True))
    return out


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The `meta` given to save_checkpoint, plus `step`."""
    read_marker(path)
    attrs = read_attrs(Path(path))
    return {"step": attrs["step"], **attrs["meta"]}


def read_checkpoint_layout(path: Path) -> dict[str, Any]:
    """How the checkpoint was written: {"world_size": N, "dtensors": {leaf path: {"mesh_shape",
    "mesh_dim_names", "placements" (e.g. ["R", "S(0)"]), "chunks" (None for a small, packed one)}}}.
    A single-process save reads as {"world_size": 1, "dtensors": {}}."""
    read_marker(path)
    layout = read_attrs(Path(path)).get("layout", {"world_size": 1, "dtensors": {}})
    assert isinstance(layout, dict)
    return layout
