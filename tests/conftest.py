"""Shared test helpers: the repository root, the test graphs, and the runs of the micro graph.

Test graphs are composed of `specs/` pieces (tests/graphs/*.yaml); a test that needs a variant
writes a graph file that `use:`s one of them and overrides what it changes (`compose`). The one
exception is SMALL_GRAPH: the tests of located errors need a self-contained file whose every line
they know.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli_runs import NODE, losses, trinity

ROOT = Path(__file__).resolve().parents[1]
TEST_GRAPHS = ROOT / "tests" / "graphs"
"""Graph files the tests run, composed of specs/ pieces: micro.yaml, micro-post.yaml."""


def compose(path: Path, graph: str, **sections: Any) -> Path:
    """Write at `path` a graph file that uses tests/graphs/`graph` and overrides `sections` (mappings
    merge into the used graph's, lists replace its lists); returns `path`."""
    use = os.path.relpath(TEST_GRAPHS / graph, path.parent)
    path.write_text(yaml.safe_dump({"use": use, **sections}, sort_keys=False))
    return path


# A complete graph file with no `use:`, so each line number is known to the tests (spec rules, located
# errors, the JSON Schema of a file as written). Everything else runs the graphs of tests/graphs.
SMALL_GRAPH = """\
name: small
seed: 0
model:
  vocab_size: 512
  d_model: 64
  n_layers: 4
  n_dense_layers: 1
  n_heads: 4
  n_kv_heads: 2
  head_dim: 16
  dense_hidden: 128
  global_every: 4
  sliding_window: 64
  moe:
    n_experts: 8
    top_k: 2
    expert_hidden: 32
tokenizer:
  vocab_size: 512
data:
  sources:
    code: {kind: demo, corpus: stdlib_code}
    docs: {kind: demo, corpus: stdlib_docs}
  phases:
    - name: phase1
      tokens: 100000
      seq_len: 128
      mix: {code: 1.0, docs: 1.0}
optim:
  batch:
    - {start_tokens: 0, sequences: 8}
parallel:
  nodes: 1
  gpus_per_node: 1
  fsdp_group: 1
  ep: 1
  micro_batch: 2
stages:
  extend:
    tokens: 10000
    seq_len: 256
    target_len: 256
    global_batch_sequences: 2
    mix: {docs: 1.0}
  sft: {seq_len: 256, tokens: 10000, global_batch_sequences: 4}
  evals:
    - {kind: heldout_loss, after: [pretrain], seq_len: 128}
execution:
  executor: local
"""


def mutate(text: str, old: str, new: str) -> tuple[str, int]:
    """Replace the one line of `text` that contains `old` by `new`; return the text and its 1-based line."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if old in line]
    assert len(hits) == 1, f"{old!r} matches lines {hits}"
    indent = lines[hits[0]][: len(lines[hits[0]]) - len(lines[hits[0]].lstrip())]
    lines[hits[0]] = indent + new.lstrip()
    return "\n".join(lines) + "\n", hits[0] + 1


@pytest.fixture
def small_graph(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_GRAPH)
    return path


# -- runs of the micro graph, made once per session and copied by the tests that change them ------


@pytest.fixture
def micro_graph(tmp_path: Path) -> Path:
    return compose(tmp_path / "micro.yaml", "micro.yaml")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The micro graph and a run of it whose tokenizer and prepare nodes are done (copied for each scenario)."""
    root = tmp_path_factory.mktemp("resume")
    graph = compose(root / "micro.yaml", "micro.yaml")
    run = root / "prepared"
    result = trinity("run", str(graph), "--run-dir", str(run), "--nodes", "prepare/phase1")
    assert result.returncode == 0, result.stdout + result.stderr
    return graph, run


@pytest.fixture(scope="session")
def straight_run(prepared: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the node."""
    graph, prepared_run = prepared
    run = tmp_path_factory.mktemp("straight") / "run"
    shutil.copytree(prepared_run, run)
    result = trinity("run", str(graph), "--run-dir", str(run), "--nodes", NODE)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


@pytest.fixture(scope="session")
def straight(straight_run: Path) -> dict[int, float]:
    """Losses of the uninterrupted run (what every interrupted run must reproduce)."""
    expected = losses(straight_run)
    assert max(expected) == 59 and expected[59] < expected[1] - 2.0  # the loss clearly falls
    return expected
