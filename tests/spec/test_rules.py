"""Every cross-field rule: a bad spec exits 2 naming file:line and the dotted field path."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import SMALL_GRAPH, mutate
from trinity.cli import app

runner = CliRunner()

# (what the rule is, the line to change, its new text, the dotted path the error must name)
RULES = [
    ("heads divisible by KV heads", "n_heads: 4", "n_heads: 5", "model.n_heads"),
    ("top-k <= routed experts", "top_k: 2", "top_k: 9", "model.moe.top_k"),
    ("dense layers <= layers", "n_dense_layers: 1", "n_dense_layers: 5", "model.n_dense_layers"),
    ("at least one MoE layer", "n_dense_layers: 1", "n_dense_layers: 4", "model.n_dense_layers"),
    (
        "sliding window <= longest sequence",
        "sliding_window: 64",
        "sliding_window: 4096",
        "model.sliding_window",
    ),
    ("tokenizer vocab <= model vocab", "  vocab_size: 512\ndata", None, "tokenizer.vocab_size"),
    (
        "world size = nodes x gpus",
        "gpus_per_node: 1",
        "gpus_per_node: 1\n  world_size: 4",
        "parallel.world_size",
    ),
    ("world divisible by FSDP group", "fsdp_group: 1", "fsdp_group: 3", "parallel.fsdp_group"),
    ("routed experts divisible by EP", "n_experts: 8", None, "model.moe.n_experts"),
    ("EP within a node", "ep: 1", "ep: 2", "parallel.ep"),
    (
        "global batch divisible by DP x micro",
        "sequences: 8}",
        "- {start_tokens: 0, sequences: 7}",
        "optim.batch.0.sequences",
    ),
    (
        "mix weights positive",
        "mix: {code: 1.0, docs: 1.0}",
        "mix: {code: -1.0, docs: 1.0}",
        "data.phases.0.mix.code",
    ),
    (
        "mix names defined sources",
        "mix: {code: 1.0, docs: 1.0}",
        "mix: {code: 1.0, web: 1.0}",
        "data.phases.0.mix.web",
    ),
    ("extension longer than pretraining", "seq_len: 256\n    target_len", None, "stages.extend.seq_len"),
    (
        "eval stage references resolve",
        "after: [pretrain]",
        "- {kind: heldout_loss, after: [rl], seq_len: 128}",
        "stages.evals.0.after",
    ),
    ("extension mix names defined sources", "mix: {docs: 1.0}", "mix: {web: 1.0}", "stages.extend.mix.web"),
    (
        "sft batch divisible by DP x micro",
        "sft: {seq_len",
        "sft: {seq_len: 256, tokens: 10000, global_batch_sequences: 3}",
        "stages.sft.global_batch_sequences",
    ),
]


def _special(old: str) -> tuple[str, int]:
    """Rules whose line is not unique on its own, or that need a second change: returns text and line."""
    if old.startswith("  vocab_size: 512\ndata"):
        text = SMALL_GRAPH.replace("tokenizer:\n  vocab_size: 512", "tokenizer:\n  vocab_size: 600")
        return text, _line_of(text, "tokenizer:\n  vocab_size: 600") + 1
    if old == "n_experts: 8":  # EP 2 needs 2 GPUs in the node and an FSDP group they divide
        text = SMALL_GRAPH.replace("gpus_per_node: 1", "gpus_per_node: 2").replace("fsdp_group: 1", "fsdp_group: 2")
        text, line = mutate(text.replace("  ep: 1", "  ep: 2"), "n_experts: 8", "n_experts: 9")
        return text, line
    text = SMALL_GRAPH.replace("    seq_len: 256\n    target_len", "    seq_len: 100\n    target_len")
    return text, _line_of(text, "    seq_len: 100\n    target_len")


def _line_of(text: str, marker: str) -> int:
    return text[: text.index(marker)].count("\n") + 1


@pytest.mark.parametrize(("rule", "old", "new", "field"), RULES, ids=[r[0] for r in RULES])
def test_rule_violation_names_file_line_and_field(
    tmp_path: Path, rule: str, old: str, new: str | None, field: str
) -> None:
    if new is None:
        text, line = _special(old)
    else:
        text, line = mutate(SMALL_GRAPH, old, new)
        if "\n" in new:
            line += new.count("\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert f"bad.yaml:{line}:" in result.stderr, result.stderr
    assert field in result.stderr
    assert "Traceback" not in result.output + result.stderr


UNKNOWN = [
    ("top level", "seed: 0", "seed: 0\nbogus: 1", "bogus"),
    ("model", "d_model: 64", "d_model: 64\n  bogus: 1", "model.bogus"),
    ("model.moe", "top_k: 2", "top_k: 2\n    bogus: 1", "model.moe.bogus"),
    (
        "data source",
        "code: {kind: demo, corpus: stdlib_code}",
        "code: {kind: demo, corpus: stdlib_code, bogus: 1}",
        "data.sources.code.bogus",
    ),
    ("phase", "tokens: 100000", "tokens: 100000\n      bogus: 1", "data.phases.0.bogus"),
    ("parallel", "micro_batch: 2", "micro_batch: 2\n  bogus: 1", "parallel.bogus"),
    (
        "stages.sft",
        "sft: {seq_len",
        "sft: {seq_len: 256, tokens: 10000, global_batch_sequences: 4, bogus: 1}",
        "stages.sft.bogus",
    ),
    ("execution", "executor: local", "executor: local\n  slurm: {bogus: 1}", "execution.slurm.bogus"),
]


@pytest.mark.parametrize(("where", "old", "new", "field"), UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_fields_rejected_everywhere(tmp_path: Path, where: str, old: str, new: str, field: str) -> None:
    text, line = mutate(SMALL_GRAPH, old, new)
    line += new.count("\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"bad.yaml:{line}: {field}: unknown field; allowed:" in result.stderr, result.stderr


def test_balancing_kind_lists_allowed_values(tmp_path: Path) -> None:
    text = SMALL_GRAPH.replace("optim:\n", "stability:\n  balancing: {kind: fancy}\noptim:\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "stability.balancing" in result.stderr
    assert "'smebu', 'sign', 'none'" in result.stderr


def test_set_override_errors_name_the_override(small_graph: Path) -> None:
    result = runner.invoke(app, ["validate", str(small_graph), "--set", "model.moe.top_k=20"])
    assert result.exit_code == 2
    assert "--set #1 (model.moe.top_k=20): model.moe.top_k = 20 must be <= n_experts (8)" in result.stderr


def test_valid_small_graph_passes(small_graph: Path) -> None:
    result = runner.invoke(app, ["validate", str(small_graph)])
    assert result.exit_code == 0, result.output
