"""Node identity: a hash of the canonical JSON of the fields that change a node's result.

Execution-only fields (marked with `execution_only()` in the spec models: the whole `execution`
section, the GPU layout) are left out, so moving a run to another partition or cluster re-runs
nothing. Fields added after runs existed (`added_field()`) are left out while at their default, so
a new version of trinity keeps the identities of specs that do not use them. Hashing refuses what
it cannot hash reproducibly: objects, NaN, infinities. Floats are written as their shortest
round-trip repr, so 1e-3, 0.001 and 1.0e-3 hash the same.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from trinity.spec.base import is_execution_only, omits_default


class UnhashableValue(TypeError):
    """A value whose canonical form is not reproducible."""


def identity_payload(model: BaseModel) -> dict[str, Any]:
    """The result-affecting fields of `model`, recursively, keyed by their YAML names."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if is_execution_only(type(model), name):
            continue
        value = getattr(model, name)
        if omits_default(type(model), name) and value == info.get_default(call_default_factory=True):
            continue  # a field newer than the identities already computed: absent unless it is used
        out[info.alias or name] = _payload_value(getattr(model, name))
    return out


def _payload_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return identity_payload(value)
    if isinstance(value, Mapping):
        return {str(k): _payload_value(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_payload_value(v) for v in value]
    return value


def canonical(value: Any, path: str = "") -> Any:
    """`value` as plain JSON data with canonical floats; raises UnhashableValue otherwise."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnhashableValue(f"{path or 'value'} = {value!r}: NaN and infinities cannot be hashed")
        return {"float": repr(value)}
    if isinstance(value, Mapping):
        return {str(k): canonical(v, f"{path}.{k}" if path else str(k)) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise UnhashableValue(f"{path or 'value'}: cannot hash a {type(value).__name__} reproducibly")


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, no spaces, floats tagged by their shortest repr."""
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def node_identity(kind: str, payload: Mapping[str, Any], upstream: Sequence[str]) -> str:
    """The identity of a node: sha256 over its kind, its payload and its upstream identities."""
    text = canonical_json({"kind": kind, "payload": dict(payload), "upstream": sorted(upstream)})
    return hashlib.sha256(text.encode()).hexdigest()
