"""Walk the spec models along a data path: which fields are allowed where (for error messages)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

Path_ = tuple[str | int, ...]


def allowed_fields(root: type[BaseModel], path: Path_, data: Any) -> list[str]:
    """The field names (YAML spelling) of the model found at `path`, or [] if none is found there."""
    model = model_at(root, path, data)
    if model is None:
        return []
    return sorted(f.alias or name for name, f in model.model_fields.items())


def model_at(root: type[BaseModel], path: Path_, data: Any) -> type[BaseModel] | None:
    """The spec model class at `path`, resolving optionals, tuples, dicts and tagged unions by data."""
    annotation: Any = root
    node = data
    for part in path:
        model = _pick_model(annotation, node)
        if model is not None:
            field = _field_by_key(model, str(part))
            if field is None:
                return None
            annotation = field
        else:
            annotation = _element(annotation)
            if annotation is None:
                return None
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return _pick_model(annotation, node)


def _field_by_key(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field.annotation
    return None


def _pick_model(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The model class an annotation denotes for this data (a union picks by `kind`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _pick_model(typing.get_args(annotation)[0], node)
    if origin in (typing.Union, types.UnionType):
        models = [m for a in typing.get_args(annotation) if (m := _pick_model(a, node)) is not None]
        kind = node.get("kind") if isinstance(node, dict) else None
        for m in models:
            field = m.model_fields.get("kind")
            if field is not None and field.default == kind:
                return m
        return models[0] if len(models) == 1 else None
    return None


def _element(annotation: Any) -> Any:
    """The element type of a tuple/list/dict annotation (through Optional and Annotated)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _element(args[0])
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None) and (element := _element(arg)) is not None:
                return element
        return None
    if origin in (tuple, list) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None
