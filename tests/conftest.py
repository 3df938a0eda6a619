"""Shared test helpers: the repository root and a self-contained small graph file to mutate."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A complete graph file with no `use:`, so each line number is known to the tests.
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
