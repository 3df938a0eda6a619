"""Activation checkpointing (trinity.model.checkpointing) against the same model without it.

Same weights, same batch: a recompute replays the same operations on the same inputs (CPU kernels
are deterministic, the autocast state and RNG are restored), so the loss, the expert counts, the
aux losses and every gradient must be bit-identical (torch.equal), in fp32 and under bf16
autocast. Each policy must also really recompute what it names (forward calls counted by hooks)
and lower the step's peak memory (torch's MemTracker); names and state-dict keys stay as they are;
activation capture records each forward once, not the replay. The 2-rank test does the same under
FSDP2 with expert parallelism (ep = 2), where the replayed MoE repeats its all-to-all.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor

from tests.distributed.test_training_parity import MODEL as PARITY_MODEL
from trinity.model import TransformerBlock, TrinityModel
from trinity.model.checkpointing import apply_activation_checkpointing
from trinity.spec.model import ModelSpec
from trinity.spec.parallel import ParallelSpec
from trinity.store.activations import ActivationCapture
from trinity.store.checkpoint import load_checkpoint

MODEL: dict[str, Any] = PARITY_MODEL  # the distributed parity tests' model: MoE, a dense layer, local + global
B, T = 2, 64
POLICIES: dict[str, dict[str, Any]] = {
    "full": dict(activation_checkpointing="full"),
    "selective_save_moe": dict(activation_checkpointing="selective", selective_save="moe"),
    "selective_save_attention": dict(activation_checkpointing="selective", selective_save="attention"),
}
# Which sublayers each policy recomputes (their forward runs twice per step).
RECOMPUTED = {"full": {"attn", "mlp"}, "selective_save_moe": {"attn"}, "selective_save_attention": {"mlp"}}


def parallel(**fields: Any) -> ParallelSpec:
    return ParallelSpec(**fields)


def base_model() -> TrinityModel:
    torch.manual_seed(0)
    model = TrinityModel(ModelSpec.model_validate(MODEL))
    with torch.no_grad():  # a non-zero expert bias, so routing is not plain top-k of the scores
        for moe in model.moe_layers():
            moe.expert_bias.copy_(torch.randn_like(moe.expert_bias) * 0.05)
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, targets, document ids: two documents per row, so the masks are exercised)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MODEL["vocab_size"], (B, T + 1), generator=g)
    doc_ids = (torch.arange(T) >= T // 3).long().expand(B, T)
    return ids[:, :-1], ids[:, 1:], doc_ids


def train_step(model: TrinityModel, precision: str = "fp32", seed: int = 1) -> dict[str, Any]:
    """One forward + backward of the trainer's loss; what it produced, and every gradient."""
    ids, targets, doc_ids = batch(seed)
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        out = model(ids, doc_ids_BT=doc_ids, labels_BT=targets)
    assert out.ce_loss is not None and out.z_loss_term is not None
    loss = out.ce_loss + 1e-4 * out.z_loss_term + 1e-3 * out.aux_loss_per_layer.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "counts": out.expert_counts, "aux": out.aux_loss_per_layer.detach(), "grads": grads}


def assert_same_step(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert torch.equal(got["loss"], want["loss"])
    assert torch.equal(got["counts"], want["counts"])  # counted once: the replay's counts are not added
    assert torch.equal(got["aux"], want["aux"])
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        assert torch.equal(got["grads"][name], grad), name


def count_forwards(model: TrinityModel) -> dict[str, int]:
    """Hooks counting the forward calls of every block's attn and mlp (summed over blocks).

    Pre-hooks: a replay stops as soon as the last tensor the backward needs is recomputed
    (torch's early stop), so a region's own post-forward hooks may not run again; its pre-hooks do.
    """
    calls = {"attn": 0, "mlp": 0}

    def counter(kind: str) -> Any:
        def hook(*_: Any) -> None:
            calls[kind] += 1

        return hook

    for block in model.layers:
        assert isinstance(block, TransformerBlock)
        block.attn.register_forward_pre_hook(counter("attn"))
        block.mlp.register_forward_pre_hook(counter("mlp"))
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_gradients_counts_and_aux_equal_the_plain_step(policy: str, precision: str) -> None:
    base = base_model()
    want = train_step(copy.deepcopy(base), precision)
    model = copy.deepcopy(base)
    apply_activation_checkpointing(model, parallel(**POLICIES[policy]))
    calls = count_forwards(model)
    got = train_step(model, precision)
    assert_same_step(got, want)
    n = MODEL["n_layers"]
    assert calls == {kind: 2 * n if kind in RECOMPUTED[policy] else n for kind in calls}


@pytest.mark.parametrize("value", ["none", False])
def test_none_recomputes_nothing(value: str | bool) -> None:
    model = base_model()
    apply_activation_checkpointing(model, parallel(activation_checkpointing=value))
    calls = count_forwards(model)
    train_step(model)
    assert calls == {"attn": MODEL["n_layers"], "mlp": MODEL["n_layers"]}


@pytest.mark.slow  # MemTracker follows every op in Python: ~20x a plain step
def test_peak_memory_is_lower() -> None:
    """MemTracker's peak (tensor storages) of one step: every policy below none, full lowest."""
    base = base_model()
    peaks = {}
    for name, fields in {"none": dict(activation_checkpointing="none"), **POLICIES}.items():
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, parallel(**fields))
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            train_step(model)
        peaks[name] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert all(peaks[name] < peaks["none"] for name in POLICIES), peaks
    assert peaks["full"] == min(peaks.values()), peaks


def test_names_and_state_dict_unchanged_and_plain_checkpoints_load() -> None:
    plain = base_model()
    trained = copy.deepcopy(plain)
    with torch.no_grad():  # different values, so the load below is seen
        for p in trained.parameters():
            p.add_(1.0)
    for fields in POLICIES.values():
        model = copy.deepcopy(plain)
        apply_activation_checkpointing(model, parallel(**fields))
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
        assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
        assert list(model.state_dict()) == list(plain.state_dict())
        model.load_state_dict(trained.state_dict(), strict=True)  # saved without checkpointing
        for name, value in trained.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name


def test_apply_twice() -> None:
    model = base_model()
    full = parallel(activation_checkpointing="full")
    apply_activation_checkpointing(model, full)
    apply_activation_checkpointing(model, full)  # the same policy again: nothing more
    calls = count_forwards(model)
    train_step(model)
    assert calls == {"attn": 2 * MODEL["n_layers"], "mlp": 2 * MODEL["n_layers"]}
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_checkpointing(model, parallel(activation_checkpointing="selective"))


@pytest.mark.filterwarnings("ignore:Object at COMMITTED is not recognized")  # zarr, listing the marker file
def test_activation_capture_records_each_forward_once(tmp_path: Path) -> None:
    """Capture held over forward AND backward (as the trainer holds it) sees the forward, not the replay."""
    names = ["layers.1", "layers.2.mlp", "layers.3"]  # a block, an MoE inside a block, a block
    base = base_model()
    captured = {}
    for policy in ("none", "full", "selective_save_attention"):
        model = copy.deepcopy(base)
        fields = POLICIES.get(policy, dict(activation_checkpointing="none"))
        apply_activation_checkpointing(model, parallel(**fields))
        calls = count_forwards(model)
        capture = ActivationCapture(model, names, steps={7}, out_root=tmp_path / policy)
        with capture, capture.at_step(7):
            train_step(model)
        if policy != "none":
            assert calls["mlp"] == 2 * MODEL["n_layers"]  # the MoE hooks did run again, in backward
        captured[policy] = load_checkpoint(tmp_path / policy / "step-00000007")
    for policy in ("full", "selective_save_attention"):
        for name in names:
            for kind, value in captured["none"][name].items():
                assert value.shape[0] == B
                assert torch.equal(captured[policy][name][kind], value), (policy, name, kind)


def fsdp_ep_worker(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Every policy on this rank: FSDP2 over 2 ranks with ep = 2, each rank its own batch."""
    from trinity.distributed import expert_parallel
    from trinity.distributed.mesh import build_mesh, layout_for
    from trinity.distributed.parallelize import parallelize, rescale_expert_gradients

    results = {}
    mesh = None
    for name, fields in {"none": dict(activation_checkpointing="none"), **POLICIES}.items():
        spec = parallel(nodes=1, gpus_per_node=world, fsdp_group=world, ep=2, param_dtype="fp32", **fields)
        layout = layout_for(spec, world, MODEL["moe"]["n_experts"])
        mesh = mesh or build_mesh(layout, "cpu")
        model = parallelize(base_model(), mesh, layout, spec, "fp32")
        expert_parallel.reset_stats()
        step = train_step(model, seed=1 + rank)
        rescale_expert_gradients(model, layout)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        step["grads"] = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}
        step["exchanges"] = expert_parallel.read_stats()["forward_calls"]
        results[name] = step
    return results


@pytest.mark.slow  # two gloo processes
def test_two_ranks_fsdp2_expert_parallel() -> None:
    """Under FSDP2 + ep = 2 every policy gives the plain run's gradients, counts and aux, bit for bit;
    recomputing the MoE replays its three forward exchanges per MoE layer, recomputing attention does not."""
    from trinity.distributed.testing import run_workers

    n_moe = MODEL["n_layers"] - MODEL["n_dense_layers"]
    for rank_results in run_workers(fsdp_ep_worker, 2, timeout_s=120):
        want = rank_results["none"]
        assert want["exchanges"] == 3 * n_moe
        for name in POLICIES:
            assert_same_step(rank_results[name], want)
            replays = "mlp" in RECOMPUTED[name]
            assert rank_results[name]["exchanges"] == 3 * n_moe * (2 if replays else 1), name
