"""The base of every spec model, and the markers that shape identity.

Every spec model is frozen, rejects unknown fields, and takes each field's docstring as its
description (it becomes the JSON Schema description and an editor's tooltip).

Numbers are strict, in one place (`SpecModel.__get_pydantic_core_schema__`): an int field takes an
int, or a float with no fractional part (`tokens: 1e12`), never a bool or a string; a float field
takes an int or a finite float, never a bool, a string, `.inf` or `.nan`; a bool field takes only a
bool. Everything else keeps pydantic's lax mode, so paths, enums, literals and tuples are still read
from YAML strings and lists.

A field marked with `execution_only()` never enters a node's identity: changing it (a Slurm
partition, a log cadence, a path) never causes a finished node to re-run. A field marked with
`added_field()` (one added to a spec section after runs already existed) enters the identity only
when it differs from its default, so upgrading trinity re-runs no finished node whose spec does not
use the new field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema

IDENTITY_KEY = "trinity_identity"
OMIT_DEFAULT = "omit_default"
"""IDENTITY_KEY's value for a field that enters the identity only when it differs from its default."""


def strict_numbers(schema: Any) -> Any:
    """A copy of the core schema `schema` whose int, float and bool validators are strict (see above)."""
    if isinstance(schema, list):
        return [strict_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "function-before" and schema.get("function", {}).get("function") is integral_to_int:
        return schema  # already strict: a nested model's schema, made by its own class
    out = {key: strict_numbers(value) for key, value in schema.items()}
    kind = out.get("type")
    if kind == "int":
        return core_schema.no_info_before_validator_function(integral_to_int, {**out, "strict": True})
    if kind == "float":
        return {**out, "strict": True, "allow_inf_nan": False}
    if kind == "bool":
        return {**out, "strict": True}
    return out


def integral_to_int(value: Any) -> Any:
    """A float with no fractional part as an int (YAML writes `1e12` as a float); anything else as is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class SpecModel(BaseModel):
    """Frozen, strict base for all spec sections."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type[BaseModel], handler: GetCoreSchemaHandler) -> CoreSchema:
        schema: CoreSchema = strict_numbers(handler(source))
        return schema


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


def added_field(default: Any = ..., **kwargs: Any) -> Any:
    """A field added after runs existed: it enters node identities only when it differs from `default`
    (so the identities of specs that leave it at its default are the ones older trinity computed)."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[IDENTITY_KEY] = OMIT_DEFAULT
    return Field(default, json_schema_extra=extra, **kwargs)


def omits_default(model: type[BaseModel], name: str) -> bool:
    """Whether field `name` of `model` is marked with `added_field` (left out of identities at its default)."""
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get(IDENTITY_KEY) == OMIT_DEFAULT
