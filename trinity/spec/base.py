"""The base of every spec model, and the markers that shape identity.

Every spec model is frozen, rejects unknown fields, and takes each field's docstring as its
description (it becomes the JSON Schema description and an editor's tooltip).

A field marked with `execution_only()` never enters a node's identity: changing it (a Slurm
partition, a log cadence, a path) never causes a finished node to re-run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IDENTITY_KEY = "trinity_identity"


class SpecModel(BaseModel):
    """Frozen, strict base for all spec sections."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )


def execution_only(default: Any = ..., **kwargs: Any) -> Any:
    """A field that changes how or where a node runs, never what it computes.

    Such fields are excluded from node identities (see `trinity.graph.identity`).
    """
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[IDENTITY_KEY] = False
    return Field(default, json_schema_extra=extra, **kwargs)


def is_execution_only(model: type[BaseModel], name: str) -> bool:
    """Whether field `name` of `model` is marked execution-only."""
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get(IDENTITY_KEY) is False
