"""TrinityModel's output contract, its initialisation scheme, the tiny preset and its parameter count."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from trinity.graph.estimates import count_params
from trinity.model import TrinityModel
from trinity.spec.model import ModelSpec

TINY = Path(__file__).parents[2] / "specs" / "model" / "tiny.yaml"


def small_spec(**kw: object) -> ModelSpec:
    base: dict[str, object] = dict(
        vocab_size=97,
        d_model=32,
        n_layers=4,
        n_dense_layers=1,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        dense_hidden=48,
        sliding_window=8,
        moe=dict(n_experts=4, top_k=2, expert_hidden=16, route_scale=2.0),
    )
    base.update(kw)
    return ModelSpec.model_validate(base)


def test_outputs_match_independent_losses() -> None:
    torch.manual_seed(0)
    model = TrinityModel(small_spec())
    ids = torch.randint(0, 97, (2, 20))
    labels = torch.randint(0, 97, (2, 20))
    labels[0, :5] = -100
    out = model(ids, labels_BT=labels)
    want_ce = F.cross_entropy(out.logits.view(-1, 97), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, want_ce)
    lse = torch.logsumexp(out.logits, -1)[labels != -100]
    torch.testing.assert_close(out.z_loss_term, lse.square().mean())
    assert out.expert_counts.shape == (3, 4) and out.expert_counts.dtype == torch.int64
    assert (out.expert_counts.sum(-1) == 2 * 20 * 2).all()
    assert out.aux_loss_per_layer.shape == (3,)
    (out.ce_loss + out.aux_loss_per_layer.sum()).backward()
    assert model.layers[1].mlp.router.weight.grad is not None  # the aux loss reaches the router


def test_doc_ids_isolate_documents() -> None:
    """With intra-document masking, a document's logits do not depend on the one packed before it."""
    torch.manual_seed(1)
    model = TrinityModel(small_spec())
    a, b = torch.randint(0, 97, (1, 13)), torch.randint(0, 97, (1, 11))
    other = torch.randint(0, 97, (1, 13))
    docs = torch.tensor([[0] * 13 + [1] * 11])
    from trinity.model.rope import positions_from_doc_ids

    pos = positions_from_doc_ids(docs)
    first = model(torch.cat([a, b], 1), doc_ids_BT=docs, position_ids_BT=pos).logits[:, 13:]
    second = model(torch.cat([other, b], 1), doc_ids_BT=docs, position_ids_BT=pos).logits[:, 13:]
    alone = model(b).logits
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, alone, atol=1e-5, rtol=1e-5)


def test_init_scheme() -> None:
    spec = small_spec(d_model=256, n_heads=4, head_dim=64, dense_hidden=512, vocab_size=1000)
    model = TrinityModel(spec)
    std = 0.5 / math.sqrt(256)
    w = model.layers[0].attn.wq.weight
    assert w.abs().max() <= 3 * std + 1e-7
    # A normal truncated at 3 std has std ~0.9866 x std.
    assert w.std().item() == pytest.approx(0.9866 * std, rel=0.05)
    assert model.layers[2].mlp.experts.w1_EFD.std().item() == pytest.approx(0.9866 * std, rel=0.05)
    for block in model.layers:
        assert torch.all(block.post_attn_norm.weight == 1 / math.sqrt(4))
        assert torch.all(block.post_mlp_norm.weight == 1 / math.sqrt(4))
        assert torch.all(block.attn_norm.weight == 1) and torch.all(block.attn.q_norm.weight == 1)
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    names = dict(model.named_buffers())
    assert names["layers.1.mlp.expert_bias"].dtype == torch.float32
    assert "layers.1.mlp.expert_bias_momentum" in model.state_dict()


def test_embedding_scaled_by_sqrt_d_model() -> None:
    torch.manual_seed(2)
    on, off = TrinityModel(small_spec()), TrinityModel(small_spec(embedding_scale="none"))
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        for m in (on, off):  # make the first layer's attention the identity, so x_0 reaches the norm
            m.layers[0].post_attn_norm.weight.zero_()
    seen: list[torch.Tensor] = []
    for m in (on, off):
        m.layers[0].attn_norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        m(torch.tensor([[3, 4]]))
    torch.testing.assert_close(seen[0], seen[1] * math.sqrt(32))


def test_tiny_preset_builds_and_trains_a_step() -> None:
    spec = ModelSpec.model_validate(yaml.safe_load(TINY.read_text()))
    model = TrinityModel(spec)
    ids = torch.randint(0, spec.vocab_size, (1, 200))  # longer than its sliding window of 128
    out = model(ids, labels_BT=ids)
    out.ce_loss.backward()
    assert math.isfinite(out.ce_loss.item()) and out.ce_loss.item() == pytest.approx(math.log(4096), rel=0.1)


def test_parameter_count_equals_the_plans_estimate() -> None:
    """The count `trinity plan` prints (graph.estimates, from the spec alone) equals what torch allocates."""
    base = yaml.safe_load(TINY.read_text())
    for changes in ({}, {"tie_embeddings": True}, {"qk_norm": False, "gated_attention": False}):
        spec = ModelSpec.model_validate(base | changes)
        model = TrinityModel(spec)
        assert count_params(spec).total == sum(p.numel() for p in model.parameters()), changes
