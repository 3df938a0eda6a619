"""Nested training state <-> a JSON skeleton plus a list of array leaves.

A checkpoint holds whatever the training loop hands it: module and optimizer state dicts (int
keys, `param_groups` lists, 0-d step tensors), loader state (ints, lists, numpy arrays), RNG
states (tuples of ints, a ByteTensor). `flatten` turns such a value into

- a skeleton: JSON that records the structure with its exact Python types, and
- leaves: the torch tensors and numpy arrays, in order, each with a storage path built from
  its keys: the top-level key, '/', the rest joined by dots (`model/layers.0.attn.wq.weight`,
  `optimizer/state.3.exp_avg`). The skeleton, not the name, says where a leaf belongs.

`unflatten` rebuilds the value from the skeleton and the loaded leaves. The round trip is exact:
tuples stay tuples, int keys stay ints, floats keep every bit (stored as float.hex), an
OrderedDict keeps its `_metadata` (module state dict versions), and a tensor that appears twice
(tied weights) comes back as one tensor.

Skeleton encoding: None, bool, int (within int64) and str are themselves; everything else is an
object with a tag `t`:
    {"t": "float", "v": "0x1.8p+1"}          {"t": "bigint", "v": "340282366920938463463374607431768211455"}
    {"t": "list" | "tuple", "v": [...]}      {"t": "dict" | "odict", "k": [...], "v": [...], "m": meta?}
    {"t": "leaf", "i": 3}                    {"t": "bytes", "v": base64}
    {"t": "npscalar", "dtype": "<f4", "v": base64}
    {"t": "dtype", "v": "bfloat16"}          {"t": "device", "v": "cuda:0"}     {"t": "size", "v": [2, 3]}
"""

from __future__ import annotations

import base64
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

JSON = Any
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Leaf:
    """One array of the state: a tensor or a numpy array, and where it should be stored."""

    path: str
    value: torch.Tensor | np.ndarray[Any, Any]


def _segment(key: object) -> str:
    """A storage path segment for a dict key or list index: no '/', no '.'/'..', no leading '__'."""
    s = key if isinstance(key, str) else repr(key) if not isinstance(key, int) else str(key)
    s = s.replace("%", "%25").replace("/", "%2F")
    if s in ("", ".", "..") or s.startswith("__"):
        s = "%" + s
    return s


class _Flattener:
    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self._arrays: set[str] = set()
        self._groups: set[str] = set()
        self._tensor_ids: dict[tuple[Any, ...], int] = {}

    def _unique_path(self, parts: list[str]) -> str:
        """`parts` joined by '/', renamed with a ~n suffix if it clashes with an earlier leaf or group."""

        def clashes(p: str) -> bool:
            prefixes = p.split("/")[:-1]
            pre = ["/".join(prefixes[: i + 1]) for i in range(len(prefixes))]
            return p in self._arrays or p in self._groups or any(q in self._arrays for q in pre)

        # One group per top-level key, then the rest of the key path joined by dots: zarr creates a
        # group per path level, and a group per optimizer parameter costs more than its arrays.
        path = (parts[0] if len(parts) == 1 else f"{parts[0]}/{'.'.join(parts[1:])}") if parts else "%root"
        n = 0
        candidate = path
        while clashes(candidate):
            n += 1
            candidate = f"{path}~{n}"
        self._arrays.add(candidate)
        segs = candidate.split("/")
        self._groups.update("/".join(segs[: i + 1]) for i in range(len(segs) - 1))
        return candidate

    def _leaf(self, value: torch.Tensor | np.ndarray[Any, Any], parts: list[str]) -> JSON:
        if isinstance(value, torch.Tensor):
            # The same view of the same storage (tied weights) is stored once and restored as one tensor.
            # A DTensor has no storage of its own: its local piece's storage, with its layout, stands for it.
            local = value.to_local() if isinstance(value, DTensor) else value
            key = (
                local.device.type,
                local.untyped_storage().data_ptr() if local.numel() else id(value),
                local.storage_offset(),
                tuple(local.shape),
                local.stride(),
                value.dtype,
                tuple(value.shape),
                (id(value.device_mesh), tuple(value.placements)) if isinstance(value, DTensor) else None,
            )
            if key in self._tensor_ids:
                return {"t": "leaf", "i": self._tensor_ids[key]}
            self._tensor_ids[key] = len(self.leaves)
        self.leaves.append(Leaf(self._unique_path(parts), value))
        return {"t": "leaf", "i": len(self.leaves) - 1}

    def encode(self, value: Any, parts: list[str]) -> JSON:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int) and not isinstance(value, np.integer):
            return value if _INT64_MIN <= value <= _INT64_MAX else {"t": "bigint", "v": str(value)}
        if isinstance(value, float):
            if math.isnan(value):  # float.hex drops a NaN's sign and payload; keep its bits
                return {"t": "float", "bits": struct.pack("<d", value).hex()}
            return {"t": "float", "v": float.hex(value)}
        if isinstance(value, torch.Tensor):
            return self._leaf(value, parts)
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biufc":
                raise TypeError(f"{'/'.join(parts)}: numpy arrays of dtype {value.dtype} cannot be checkpointed")
            return self._leaf(value, parts)
        if isinstance(value, np.generic):
            return {"t": "npscalar", "dtype": value.dtype.str, "v": base64.b64encode(value.tobytes()).decode()}
        if isinstance(value, bytes):
            return {"t": "bytes", "v": base64.b64encode(value).decode()}
        if isinstance(value, torch.dtype):
            return {"t": "dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"t": "device", "v": str(value)}
        if isinstance(value, torch.Size):
            return {"t": "size", "v": list(value)}
        if isinstance(value, list | tuple) and type(value) in (list, tuple):
            tag = "list" if isinstance(value, list) else "tuple"
            return {"t": tag, "v": [self.encode(v, [*parts, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, dict) and type(value) in (dict, OrderedDict):
            out: dict[str, JSON] = {
                "t": "odict" if isinstance(value, OrderedDict) else "dict",
                "k": [self.encode(k, [*parts, "%key"]) for k in value],
                "v": [self.encode(v, [*parts, _segment(k)]) for k, v in value.items()],
            }
            meta = getattr(value, "_metadata", None)
            if meta is not None:
                out["m"] = self.encode(meta, [*parts, "%meta"])
            return out
        where = "/".join(parts) or "<root>"
        raise TypeError(f"{where}: cannot checkpoint a value of type {type(value).__qualname__}")


def flatten(value: Any) -> tuple[JSON, list[Leaf]]:
    """(skeleton, leaves) of `value`; raises TypeError naming the path of anything it cannot store exactly."""
    f = _Flattener()
    skeleton = f.encode(value, [])
    return skeleton, f.leaves


def unflatten(skeleton: JSON, leaves: list[Any]) -> Any:
    """The value `flatten` was given, with leaf i replaced by `leaves[i]`."""
    if skeleton is None or isinstance(skeleton, bool | int | str):
        return skeleton
    if not isinstance(skeleton, dict) or "t" not in skeleton:
        raise ValueError(f"malformed checkpoint skeleton node: {skeleton!r:.200}")
    tag = skeleton["t"]
    v: Any = skeleton.get("v")
    if tag == "leaf":
        return leaves[skeleton["i"]]
    if tag == "float":
        if "bits" in skeleton:
            return float(struct.unpack("<d", bytes.fromhex(skeleton["bits"]))[0])
        return float.fromhex(v)
    if tag == "bigint":
        return int(v)
    if tag in ("list", "tuple"):
        items = [unflatten(x, leaves) for x in v]
        return items if tag == "list" else tuple(items)
    if tag in ("dict", "odict"):
        keys = [unflatten(k, leaves) for k in skeleton["k"]]
        vals = [unflatten(x, leaves) for x in v]
        pairs = zip(keys, vals, strict=True)
        out: dict[Any, Any] = OrderedDict(pairs) if tag == "odict" else dict(pairs)
        if "m" in skeleton:
            out._metadata = unflatten(skeleton["m"], leaves)  # type: ignore[attr-defined]
        return out
    if tag == "npscalar":
        return np.frombuffer(base64.b64decode(v), dtype=np.dtype(skeleton["dtype"]))[0]
    if tag == "bytes":
        return base64.b64decode(v)
    if tag == "dtype":
        dt = getattr(torch, v)
        assert isinstance(dt, torch.dtype)
        return dt
    if tag == "device":
        return torch.device(v)
    if tag == "size":
        return torch.Size(v)
    raise ValueError(f"unknown checkpoint skeleton tag {tag!r}")


def leaf_targets(skeleton: JSON, like: Any) -> dict[int, tuple[str, Any]]:
    """For each leaf of `skeleton` that has a counterpart in `like` (any part of the saved tree, with
    the same keys and indices), its index -> (its key path, e.g. "model/layers.0.wq.weight", the
    value `like` holds there). Parts of `like` the skeleton lacks, and parts of the skeleton `like`
    lacks, are skipped."""
    out: dict[int, tuple[str, Any]] = {}

    def walk(node: JSON, ref: Any, parts: list[str]) -> None:
        if not isinstance(node, dict):
            return
        tag = node.get("t")
        if tag == "leaf":
            where = parts[0] if len(parts) == 1 else f"{parts[0]}/{'.'.join(parts[1:])}" if parts else "<root>"
            out.setdefault(node["i"], (where, ref))
        elif tag in ("list", "tuple") and isinstance(ref, list | tuple):
            for i, (x, r) in enumerate(zip(node["v"], ref, strict=False)):
                walk(x, r, [*parts, str(i)])
        elif tag in ("dict", "odict") and isinstance(ref, Mapping):
            for k, x in zip(node["k"], node["v"], strict=True):
                if isinstance(k, dict) and k.get("t") == "leaf":
                    continue  # a tensor used as a key: it has no counterpart to look up
                key = unflatten(k, [])
                if key in ref:
                    walk(x, ref[key], [*parts, _segment(key)])

    walk(skeleton, like, [])
    return out
