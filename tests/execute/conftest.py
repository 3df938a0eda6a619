"""A very small end-to-end graph for executor tests: seconds per node on 2 cores."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trinity.store.catalog import open_catalog

MICRO_GRAPH = """\
name: micro
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
  sliding_window: 32
  moe: {n_experts: 8, top_k: 2, expert_hidden: 32, route_scale: 2.0}
tokenizer:
  vocab_size: 512
  sample_bytes: 300000
  sources: [docs, math]
data:
  sources:
    docs: {kind: demo, corpus: stdlib_docs, max_documents: 300}
    math: {kind: demo, corpus: math}
    extra: {kind: jsonl, paths: [extra.jsonl]}
  holdout_documents: 4
  phases:
    - {name: phase1, tokens: 30000, seq_len: 64, mix: {docs: 2.0, math: 1.0},
       loader: {kind: rsdb, buffer_size: 16, workers: 1}}
    - {name: phase2, tokens: 15000, seq_len: 64, mix: {docs: 1.0, math: 1.0},
       loader: {kind: rsdb, buffer_size: 16, workers: 1}}
stability:
  balancing: {kind: smebu}
  aux_loss_weight: 1.0e-4
  z_loss_weight: 1.0e-5
  intra_document_masking: true
optim:
  muon: {lr: 0.01}
  adamw: {lr: 0.003}
  schedule: {warmup_steps: 5, decay_fraction: 0.3}
  batch:
    - {start_tokens: 0, sequences: 8}
parallel: {nodes: 1, gpus_per_node: 1, fsdp_group: 1, ep: 1, micro_batch: 4,
           accelerator: {name: cpu, peak_bf16_tflops: 0.2, memory_gib: 24}}
execution:
  checkpoint_every: 20
  keep_last: 2
  heartbeat_s: 2
  local: {threads: 1}
"""


NODE = "pretrain/phase1"


def sigint_as_ctrl_c() -> None:
    """preexec_fn for a `trinity run` that a test interrupts: SIGINT back to its default disposition.

    A test run started from a non-interactive shell's background job (`cmd &`) inherits SIGINT as
    ignored, and Python then never turns it into KeyboardInterrupt; a terminal's Ctrl-C does not.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_until_step(graph: Path, run: Path, step: int, timeout_s: float = 300) -> subprocess.Popen[str]:
    """`trinity run GRAPH --run-dir RUN --nodes NODE` in the background, returned once NODE reports `step`
    (a test then kills or interrupts it). SIGINT keeps its default disposition (see sigint_as_ctrl_c)."""
    from trinity.run.layout import RunDir
    from trinity.run.status import NodeStatus

    proc = subprocess.Popen(
        [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(run), "--nodes", NODE],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_ctrl_c,
    )
    node_dir = RunDir(run).node(NODE)
    deadline = time.monotonic() + timeout_s
    while NodeStatus.read(node_dir).progress.get("step", 0) < step:
        assert proc.poll() is None and time.monotonic() < deadline, f"the node ended before it reached step {step}"
        time.sleep(0.05)
    return proc


def trinity(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "trinity.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run whose tokenizer and prepare nodes are done (copied for each scenario)."""
    root = tmp_path_factory.mktemp("resume")
    graph = root / "micro.yaml"
    graph.write_text(MICRO_GRAPH.replace("    extra: {kind: jsonl, paths: [extra.jsonl]}\n", ""))
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


def losses(run: Path) -> dict[int, float]:
    con = open_catalog(run)
    return dict(con.sql(f"select step, loss from steps where node = '{NODE}' order by step").fetchall())


@pytest.fixture
def micro_graph(tmp_path: Path) -> Path:
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO_GRAPH)
    return path
