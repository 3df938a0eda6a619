"""Training nodes started from `init:` (trinity.nodes.init_source): the architecture check names both
shapes (exit 2), and a run starts each stage with the source's weights (the `init` event's digest
against one computed here from the source's own files)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.cli_runs import trinity
from tests.conftest import compose
from tests.graph.test_init_sources import DECAY, DECAY_LR, PHASE1, fake_run, graph_with
from trinity.cli import app
from trinity.interop.hf import hf_config_dict, save_pretrained
from trinity.model import TrinityModel
from trinity.run.layout import RunDir
from trinity.spec.loading import load_experiment
from trinity.store.catalog import open_catalog
from trinity.store.checkpoint import load_checkpoint

runner = CliRunner()


def test_a_run_source_of_another_shape_is_refused_naming_both_shapes(tmp_path: Path) -> None:
    spec = load_experiment(graph_with(tmp_path, {"from": "pretrain/phase1"}, "base.yaml")).spec
    other = fake_run(tmp_path / "other", "a" * 64)
    data = {"model": {**spec.model.model_dump(mode="json", by_alias=True), "vocab_size": 1024}}
    (other / "spec.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", str(graph_with(tmp_path, {"run": "other", "node": "pretrain/phase1"}))])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert (
        "data.phases.1.init.run the architectures differ: "
        "tok_embeddings.weight: [1024, 64] in the source, [512, 64] here" in text
    )


def test_an_hf_source_of_another_shape_is_refused_naming_both_shapes(tmp_path: Path) -> None:
    spec = load_experiment(graph_with(tmp_path, {"from": "pretrain/phase1"}, "base.yaml")).spec
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = {**hf_config_dict(spec.model), "hidden_size": 2 * spec.model.d_model}
    (hf / "config.json").write_text(json.dumps(cfg))
    (hf / "model.safetensors").write_bytes(b"x")
    result = runner.invoke(app, ["validate", str(graph_with(tmp_path, {"hf": "hf"}))])
    assert result.exit_code == 2
    assert (
        "init.hf the architectures differ: tok_embeddings.weight: [512, 128] in the source, [512, 64] here"
        in " ".join(result.output.split())
    )


def digest(model_sd: dict[str, torch.Tensor]) -> str:
    """The `init` event's model_sha256, computed independently: key|dtype|shape| then the raw bytes, by key."""
    h = hashlib.sha256()
    for key in sorted(model_sd):
        t = model_sd[key].contiguous()
        h.update(f"{key}|{str(t.dtype).split('.')[-1]}|{list(t.shape)}|".encode())
        h.update(
            t.numpy().view("uint8").tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
        )
    return h.hexdigest()


def init_events(run: Path) -> dict[str, dict[str, Any]]:
    rows = open_catalog(run).sql("select node, step, data from events where kind = 'init'").fetchall()
    return {node: {"step": step, **json.loads(data)} for node, step, data in rows}


@pytest.mark.slow
def test_stages_start_from_the_source_weights(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """Run A: phase1, then `decay` from pretrain/phase1@20 (same graph). Run B: phase1 from run A's
    phase1@40 (another run), then `decay` from a Hugging Face export of run A's final phase1."""
    _, prepared_run = prepared
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(prepared_run, run_a)
    graph_a = compose(
        tmp_path / "a.yaml",
        "micro.yaml",
        data={"phases": [PHASE1, {**DECAY, "init": {"from": "pretrain/phase1@20"}, "lr": DECAY_LR}]},
    )
    result = trinity("run", str(graph_a), "--run-dir", str(run_a), "--force")  # another graph into the copy
    assert result.returncode == 0, result.stdout + result.stderr
    phase1 = RunDir(run_a).node("pretrain/phase1")
    at20 = phase1.checkpoints / "step-00000020"
    assert (at20 / "COMMITTED").is_file()  # kept: keep_last is 2, but decay starts from it (referenced_steps)
    event = init_events(run_a)["pretrain/decay"]
    assert event["step"] == event["source_step"] == 20 and event["source"] == "pretrain/phase1@20"
    assert event["model_sha256"] == digest(load_checkpoint(at20)["model"])
    steps = open_catalog(run_a).sql("select min(step) from steps where node = 'pretrain/decay'").fetchall()
    assert steps == [(21,)]  # counting continues from the source's step

    hf = tmp_path / "hf"
    final = load_checkpoint(phase1.checkpoints / "step-00000059")["model"]
    spec = load_experiment(graph_a).spec
    model = TrinityModel(spec.model)
    model.load_state_dict(final)
    save_pretrained(model, hf)
    shutil.copytree(prepared_run, run_b)
    graph_b = compose(
        tmp_path / "b.yaml",
        "micro.yaml",
        data={
            "phases": [
                {**DECAY, "name": "phase1", "init": {"run": "a", "node": "pretrain/phase1", "step": 40}},
                {**DECAY, "init": {"hf": "hf"}},
            ]
        },
    )
    result = trinity("run", str(graph_b), "--run-dir", str(run_b), "--force")  # another graph into the copy
    assert result.returncode == 0, result.stdout + result.stderr
    events = init_events(run_b)
    assert events["pretrain/phase1"]["model_sha256"] == digest(
        load_checkpoint(phase1.checkpoints / "step-00000040")["model"]
    )
    no_momentum = {k: torch.zeros_like(v) if k.endswith("expert_bias_momentum") else v for k, v in final.items()}
    assert events["pretrain/decay"]["model_sha256"] == digest(no_momentum)  # float32 export: exact
    assert events["pretrain/decay"]["step"] == 0
