"""Every node kind (trinity.graph.kinds.NODE_KINDS) has a body and a verifier to run (trinity.nodes.registry)."""

from __future__ import annotations

import inspect

import pytest

from trinity.graph.kinds import NODE_KINDS
from trinity.nodes.registry import BODIES, node_body


def test_the_registry_covers_exactly_the_node_kinds() -> None:
    assert set(BODIES) == set(NODE_KINDS)


@pytest.mark.parametrize("kind", NODE_KINDS)
def test_each_kind_resolves_to_a_body_and_a_verifier_taking_the_context(kind: str) -> None:
    body = node_body(kind)  # type: ignore[arg-type]
    for function in (body.run, body.verify):
        assert callable(function)
        assert len(inspect.signature(function).parameters) == 1, function  # (ctx: NodeContext)
