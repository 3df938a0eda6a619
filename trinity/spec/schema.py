"""The JSON Schema of a graph file, for editors and for checking files without trinity.

It is the schema of `ExperimentSpec`, widened for composition: any mapping may hold `use:`
(a relative path or a list of them), and since a piece may supply them, no field is required.
"""

from __future__ import annotations

from typing import Any

from trinity.spec.experiment import ExperimentSpec

USE_SCHEMA: dict[str, Any] = {
    "description": (
        "Spec pieces (paths relative to this file, inside the project or TRINITY_SPEC_ROOT) "
        "merged under this mapping's own keys."
    ),
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
}


def graph_file_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a trinity graph file."""
    schema = ExperimentSpec.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "trinity experiment graph"
    _widen(schema)
    return schema


def _widen(node: Any) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict):
            node["properties"]["use"] = USE_SCHEMA
            node.pop("required", None)
        for value in node.values():
            _widen(value)
    elif isinstance(node, list):
        for value in node:
            _widen(value)
