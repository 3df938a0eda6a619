"""Upgrading trinity keeps the identities of finished nodes: a run made before a release is reused after it.

golden/identities-0.17.json holds the node identities of the shipped graphs as computed by the code of
issue 17 (commit 77d72f8); the three presets' entries were recomputed in issue 19, whose recipe changes
(loaders per phase, decay start, extension sampling, SFT budget) changed their specs on purpose, and the
tiny graph's training nodes in issue 20, when it set optim.muon.ns_dtype: fp32 (a CPU step 12x faster).
Fields added since are declared with `added_field` and enter an identity only when a spec sets them to
something else than their default; this pins that rule on real graphs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.conftest import ROOT
from trinity.graph.compile import compile_graph
from trinity.graph.identity import identity_payload
from trinity.spec.base import SpecModel, added_field
from trinity.spec.loading import load_experiment

GOLDEN = json.loads((Path(__file__).parent / "golden" / "identities-0.17.json").read_text())


@pytest.mark.parametrize("graph_file", sorted(GOLDEN))
def test_shipped_graphs_keep_their_identities(graph_file: str) -> None:
    graph = compile_graph(load_experiment(ROOT / graph_file, []))
    now = {n: graph.nodes[n]["node"].identity for n in graph.nodes}
    assert {n: now.get(n) for n in GOLDEN[graph_file]} == GOLDEN[graph_file]


class _Old(SpecModel):
    lr: float = 0.1


class _New(SpecModel):
    lr: float = 0.1
    spikes: str | None = added_field(None)
    """A field added after runs existed."""


def _payload(model: BaseModel) -> dict[str, object]:
    return identity_payload(model)


def test_added_field_enters_identity_only_away_from_its_default() -> None:
    assert _payload(_New()) == _payload(_Old()) == {"lr": 0.1}
    assert _payload(_New(spikes="skip")) == {"lr": 0.1, "spikes": "skip"}
    assert _payload(_New(spikes=None, lr=0.2)) == _payload(_Old(lr=0.2))
