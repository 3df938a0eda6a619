"""trinity <-> transformers' AfmoeForCausalLM: logits agree to 1e-4 both ways, expert bias carried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AfmoeConfig, AfmoeForCausalLM

from trinity.interop.hf import hf_config_dict, load_pretrained, save_pretrained
from trinity.model import TrinityModel
from trinity.spec.model import ModelSpec


def random_spec(seed: int) -> ModelSpec:
    g = torch.Generator().manual_seed(seed)

    def pick(*xs: int) -> int:
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    n_heads = pick(2, 4, 8)
    return ModelSpec.model_validate(
        dict(
            vocab_size=pick(101, 256),
            d_model=pick(32, 48, 64),
            n_layers=pick(5, 6, 8),  # several local and at least one global layer
            n_dense_layers=pick(1, 2),
            n_heads=n_heads,
            n_kv_heads=pick(*[k for k in (2, 4) if n_heads % k == 0]),  # more than one KV head
            head_dim=pick(8, 16),
            dense_hidden=pick(64, 96),
            sliding_window=pick(4, 7, 16),
            rope_theta=pick(10_000, 500),
            moe=dict(
                n_experts=pick(4, 6, 8),
                top_k=pick(1, 2, 3),
                expert_hidden=pick(16, 24),
                n_shared_experts=pick(1, 2),
                route_scale=2.826,
            ),
        )
    )


@pytest.mark.parametrize("seed", range(4))
def test_trinity_to_transformers_logits(seed: int, tmp_path: Path) -> None:
    spec = random_spec(seed)
    torch.manual_seed(seed)
    model = TrinityModel(spec).eval()
    for moe in model.moe_layers():
        moe.expert_bias.normal_(0, 0.05)  # biases big enough to change some top-k choices
    save_pretrained(model, tmp_path)
    hf = AfmoeForCausalLM.from_pretrained(tmp_path).eval()
    T = spec.sliding_window * 3 + 5  # longer than the window
    ids = torch.randint(0, spec.vocab_size, (2, T))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    for layer, moe in zip(range(spec.n_dense_layers, spec.n_layers), model.moe_layers(), strict=True):
        assert torch.equal(hf.model.layers[layer].mlp.expert_bias, moe.expert_bias)


@pytest.mark.parametrize("seed", range(2))
def test_transformers_to_trinity_logits(seed: int, tmp_path: Path) -> None:
    spec = random_spec(100 + seed)
    torch.manual_seed(seed)
    hf = AfmoeForCausalLM(AfmoeConfig(**hf_config_dict(spec))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # transformers zero-initialises routers: make routing real
            if "router" in name:
                p.normal_(0, 0.5)
        for layer in hf.model.layers[spec.n_dense_layers :]:
            layer.mlp.expert_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    model, loaded_spec = load_pretrained(tmp_path)
    assert loaded_spec == spec
    ids = torch.randint(0, spec.vocab_size, (2, spec.sliding_window * 2 + 3))
    with torch.no_grad():
        assert (model.eval()(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
    assert torch.equal(model.moe_layers()[0].expert_bias, hf.model.layers[spec.n_dense_layers].mlp.expert_bias)


def test_config_is_afmoe(tmp_path: Path) -> None:
    save_pretrained(TrinityModel(random_spec(7)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "afmoe" and cfg["mup_enabled"] is True
    assert cfg["layer_types"][3] == "full_attention" and cfg["layer_types"][0] == "sliding_attention"


def test_unsupported_router_refused() -> None:
    spec = random_spec(0).model_copy(
        update={"moe": random_spec(0).moe.model_copy(update={"score_function": "softmax"})}
    )
    with pytest.raises(ValueError, match="sigmoid"):
        hf_config_dict(spec)


def test_in_memory_fused_expert_layout_imports() -> None:
    """transformers keeps experts fused in memory (gate_up_proj [E, 2F, D]); that layout loads too."""
    from trinity.interop.hf import from_hf_state_dict

    spec = random_spec(3)
    torch.manual_seed(3)
    hf = AfmoeForCausalLM(AfmoeConfig(**hf_config_dict(spec))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "router" in name:
                p.normal_(0, 0.5)
    assert any(k.endswith("experts.gate_up_proj") for k in hf.state_dict())
    model = TrinityModel(spec).eval()
    from_hf_state_dict(model, hf.state_dict())
    ids = torch.randint(0, spec.vocab_size, (1, 2 * spec.sliding_window + 1))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
