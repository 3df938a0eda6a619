"""Activation capture on the tiny Trinity model: what lands in Zarr, checked against the model's own outputs;
and through a run of the micro graph's pretraining node (`execution.activations`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
import zarr

from tests.cli_runs import NODE, trinity
from trinity.model import TrinityModel
from trinity.run.layout import RunDir
from trinity.spec.model import ModelSpec
from trinity.store.activations import ActivationCapture
from trinity.store.checkpoint import load_checkpoint
from trinity.store.checkpoint_commit import MARKER, list_checkpoints

TINY = Path(__file__).parents[2] / "specs" / "model" / "tiny.yaml"
B, T = 2, 16


@pytest.fixture(scope="module")
def model() -> TrinityModel:
    torch.manual_seed(0)
    spec = ModelSpec.model_validate(yaml.safe_load(TINY.read_text()))
    m = TrinityModel(spec).eval()
    with torch.no_grad():  # a non-zero bias, so routing differs from plain top-k of the scores
        for moe in m.moe_layers():
            moe.expert_bias.copy_(torch.randn_like(moe.expert_bias) * 0.05)
    return m


@pytest.mark.filterwarnings("ignore:Object at COMMITTED is not recognized")  # zarr, listing the marker file
def test_captures_chosen_steps_only(model: TrinityModel, tmp_path: Path) -> None:
    spec = model.spec
    last = f"layers.{spec.n_layers - 1}"
    assert not spec.is_moe_layer(0) and spec.is_moe_layer(3)
    ids = torch.randint(0, spec.vocab_size, (B, T))
    outputs = {}
    with ActivationCapture(model, ["layers.0", "layers.3", last], steps={2}, out_root=tmp_path) as cap:
        for step in (1, 2, 3):
            with cap.at_step(step), torch.no_grad():
                outputs[step] = model(ids)
            assert cap._buffers == {}  # nothing kept between steps, nothing at all off the chosen steps
    assert [(s, ok) for s, _, ok in list_checkpoints(tmp_path)] == [(2, True)]
    path = tmp_path / "step-00000002"
    assert (path / MARKER).is_file()

    group = zarr.open_group(str(path), mode="r")
    assert sorted(group.group_keys()) == sorted(["layers.0", "layers.3", last])
    assert "router_scores" not in group["layers.0"]  # a dense layer has no router
    hidden_last = torch.from_numpy(group[f"{last}/hidden"][...])
    assert hidden_last.shape == (B, T, spec.d_model)
    # The last block's output, through the final norm and head, is the model's logits.
    with torch.no_grad():
        logits = model.output(model.norm(hidden_last))
    torch.testing.assert_close(logits, outputs[2].logits, rtol=0, atol=0)

    scores = torch.from_numpy(group["layers.3/router_scores"][...])
    assert scores.shape == (B, T, spec.moe.n_experts) and scores.dtype == torch.float32
    assert bool(((scores > 0) & (scores < 1)).all())  # sigmoid scores
    # Biased top-k of the captured scores reproduces the expert counts the model reported for layer 3.
    moe3 = model.layers[3].mlp
    topk = torch.topk(scores.view(-1, spec.moe.n_experts) + moe3.expert_bias, k=spec.moe.top_k, dim=-1).indices
    row = model.moe_layers().index(moe3)
    assert torch.equal(torch.bincount(topk.reshape(-1), minlength=spec.moe.n_experts), outputs[2].expert_counts[row])

    back = load_checkpoint(path)
    assert torch.equal(back["layers.3"]["router_scores"], scores)
    assert torch.equal(back[last]["hidden"], hidden_last)


def test_several_forwards_in_a_step_are_concatenated_and_hooks_removed(model: TrinityModel, tmp_path: Path) -> None:
    ids = torch.randint(0, model.spec.vocab_size, (B, T))
    cap = ActivationCapture(model, ["layers.2.mlp"], steps=[5], out_root=tmp_path)
    cap.begin_step(5)
    with torch.no_grad():
        model(ids)
        model(ids[:1])
    path = cap.end_step()
    assert path == tmp_path / "step-00000005"
    back = load_checkpoint(path)
    assert back["layers.2.mlp"]["hidden"].shape == (B + 1, T, model.spec.d_model)  # the MoE module's output
    assert back["layers.2.mlp"]["router_scores"].shape == (B + 1, T, model.spec.moe.n_experts)
    torch.testing.assert_close(back["layers.2.mlp"]["hidden"][:1], back["layers.2.mlp"]["hidden"][2:])
    cap.close()
    assert all(not m._forward_hooks for m in model.modules())


def test_unknown_layer_is_an_error(model: TrinityModel, tmp_path: Path) -> None:
    with pytest.raises(AttributeError):
        ActivationCapture(model, ["layers.99"], steps={1}, out_root=tmp_path)


@pytest.mark.slow  # end to end: a run of the pretraining node
def test_activation_capture_writes_committed_zarr(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    graph, prepared_run = prepared
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    result = trinity(
        "run",
        str(graph),
        "--run-dir",
        str(run),
        "--nodes",
        NODE,
        "--set",
        "execution.activations=[layers.3]",
        "--set",
        "execution.activation_steps=[5, 40]",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    root = RunDir(run).node(NODE).activations
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-00000005", "step-00000040"]
    assert (root / "step-00000005" / "COMMITTED").is_file()
    captured = load_checkpoint(root / "step-00000005")
    hidden = captured["layers.3"]["hidden"]
    assert hidden.shape == (8, 64, 64)  # the step's 2 micro-batches of 4 sequences x 64 tokens x d_model
    assert captured["layers.3"]["router_scores"].shape == (8, 64, 8)
