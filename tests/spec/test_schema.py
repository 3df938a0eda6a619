"""The JSON Schema of graph files validates every graph in graphs/ (with the jsonschema package)."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, SMALL_GRAPH

GRAPHS = sorted((ROOT / "graphs").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema() -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "trinity.cli", "schema"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("graph", GRAPHS, ids=[g.name for g in GRAPHS])
def test_schema_validates_every_graph(schema: dict[str, object], graph: object) -> None:
    data = yaml.safe_load(open(graph))  # noqa: SIM115
    jsonschema.Draft202012Validator(schema).validate(data)


def test_schema_validates_pieces_composed_in_place(schema: dict[str, object]) -> None:
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(SMALL_GRAPH))


def test_schema_rejects_unknown_fields_and_bad_kinds(schema: dict[str, object]) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    data = yaml.safe_load(SMALL_GRAPH)
    data["model"]["bogus"] = 1
    assert not validator.is_valid(data)
    data = yaml.safe_load(SMALL_GRAPH)
    data["stability"] = {"balancing": {"kind": "fancy"}}
    assert not validator.is_valid(data)


def test_schema_carries_field_docs(schema: dict[str, object]) -> None:
    text = json.dumps(schema)
    assert "Routed experts selected per token" in text
