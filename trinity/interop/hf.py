"""Hugging Face transformers interop: export to and import from `AfmoeForCausalLM` (needs the `hf` extra).

The architectures agree on everything PAPER.md 2 describes, so the mapping is a pure renaming:
- sliding window: transformers' mask keeps keys with t - w < s <= t, i.e. w tokens including the
  current one, exactly ModelSpec.sliding_window (no off-by-one to fix);
- global ("full_attention") layers skip RoPE in transformers too;
- embedding x sqrt(d_model) is transformers' `mup_enabled=True`;
- n shared experts of width F are one SwiGLU of width n*F on both sides;
- expert weights: transformers fuses gate and up in memory as gate_up_proj [E, 2F, D] (gate
  first) with down_proj [E, D, F], but its save_pretrained writes one gate/up/down matrix per
  expert (`experts.{e}.gate_proj.weight`, ...). We write that on-disk layout and read both.
  trinity keeps w1_EFD, w3_EFD, w2_EDF separately (at `layers.{i}.mlp.experts.`) so that Muon
  orthogonalises gate and up as the separate matrices they are.
Differences, handled honestly:
- transformers has no intra-document masking or per-document positions; an exported model
  behaves like trinity called without doc_ids (the training-time option is not a weight).
- transformers has no softmax router and always normalises gates: exporting a spec with
  score_function='softmax' or normalize_gates=False raises instead of silently changing the model.
- SMEBU momentum is optimizer-like state, not part of the transformers model: it is not exported
  (load_pretrained sets it to 0). The expert bias is carried across both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trinity.model.transformer import TrinityModel
from trinity.spec.model import ModelSpec

_TYPE_TO_HF = {"local": "sliding_attention", "global": "full_attention"}
_HF_TO_TYPE = {v: k for k, v in _TYPE_TO_HF.items()}

# trinity name (after "layers.{i}.") -> transformers name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "mlp_norm.weight": "pre_mlp_layernorm.weight",
    "post_mlp_norm.weight": "post_mlp_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wg.weight": "self_attn.gate_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
_DENSE_NAMES = {"mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight"}
_DENSE_NAMES["mlp.w2.weight"] = "mlp.down_proj.weight"
_MOE_NAMES = {
    "mlp.router.weight": "mlp.router.gate.weight",
    "mlp.expert_bias": "mlp.expert_bias",
    "mlp.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "mlp.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
    "mlp.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
}


def hf_config_dict(spec: ModelSpec) -> dict[str, object]:
    """The AfmoeConfig fields equivalent to `spec` (raises where afmoe cannot express it)."""
    m = spec.moe
    if m.score_function != "sigmoid" or not m.normalize_gates:
        raise ValueError("transformers' afmoe supports only sigmoid routing with normalised gates")
    if not (spec.qk_norm and spec.gated_attention):
        raise ValueError("transformers' afmoe always has QK-norm and gated attention")
    if m.n_shared_experts < 1:
        raise ValueError("transformers' afmoe always has a shared expert (n_shared_experts >= 1)")
    return {
        "model_type": "afmoe",
        "architectures": ["AfmoeForCausalLM"],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "intermediate_size": spec.dense_hidden,
        "moe_intermediate_size": m.expert_hidden,
        "num_hidden_layers": spec.n_layers,
        "num_dense_layers": spec.n_dense_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "num_experts": m.n_experts,
        "num_experts_per_tok": m.top_k,
        "num_shared_experts": m.n_shared_experts,
        "route_scale": m.route_scale,
        "sliding_window": spec.sliding_window,
        "global_attn_every_n_layers": spec.global_every or spec.n_layers,
        "layer_types": [_TYPE_TO_HF[t] for t in spec.attention_types()],
        "mup_enabled": spec.embedding_scale == "sqrt_d_model",
        "initializer_range": spec.init.resolved_std(spec.d_model),
    }


def spec_from_hf_config(cfg: dict[str, object]) -> ModelSpec:
    """The ModelSpec of an afmoe config.json."""

    def get(key: str, default: object = None) -> object:
        return cfg.get(key, default)

    def get_int(key: str, default: int | None = None) -> int:
        value = cfg.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, int | str):
            raise ValueError(f"afmoe config: {key} = {value!r} is not an integer")
        return int(value)

    n_layers = get_int("num_hidden_layers")
    every = get_int("global_attn_every_n_layers", 4)
    hf_types = get("layer_types")
    types = tuple(_HF_TO_TYPE[t] for t in hf_types) if isinstance(hf_types, list) else None
    default_types = tuple("global" if (i + 1) % every == 0 else "local" for i in range(n_layers))
    rope = get("rope_parameters") or {}
    theta = rope.get("rope_theta", get("rope_theta", 10_000.0)) if isinstance(rope, dict) else 10_000.0
    n_heads = get_int("num_attention_heads")
    return ModelSpec.model_validate(
        {
            "vocab_size": get("vocab_size"),
            "d_model": get("hidden_size"),
            "n_layers": n_layers,
            "n_dense_layers": get("num_dense_layers", 1),
            "n_heads": n_heads,
            "n_kv_heads": get("num_key_value_heads") or n_heads,
            "head_dim": get("head_dim"),
            "dense_hidden": get("intermediate_size"),
            "global_every": every,
            "layer_types": None if types in (None, default_types) else types,
            "sliding_window": get("sliding_window"),
            "rope_theta": theta,
            "embedding_scale": "sqrt_d_model" if get("mup_enabled") else "none",
            "tie_embeddings": bool(get("tie_word_embeddings", False)),
            "norm_eps": get("rms_norm_eps", 1e-5),
            "moe": {
                "n_experts": get("num_experts"),
                "n_shared_experts": get("num_shared_experts"),
                "top_k": get("num_experts_per_tok"),
                "expert_hidden": get("moe_intermediate_size"),
                "route_scale": get("route_scale", 1.0),
            },
        }
    )


def to_hf_state_dict(model: TrinityModel) -> dict[str, torch.Tensor]:
    """Trinity parameters and expert biases under transformers' names (contiguous copies)."""
    sd = model.state_dict()
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i, block in enumerate(model.layers):
        names = dict(_LAYER_NAMES)
        names.update(_MOE_NAMES if block.is_moe else _DENSE_NAMES)
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
        if block.is_moe:  # transformers' on-disk layout: one gate/up/down matrix per expert
            w1, w3, w2 = (sd[f"layers.{i}.mlp.experts.{n}"] for n in ("w1_EFD", "w3_EFD", "w2_EDF"))
            for e in range(w1.shape[0]):
                prefix = f"model.layers.{i}.mlp.experts.{e}"
                out[f"{prefix}.gate_proj.weight"] = w1[e]
                out[f"{prefix}.up_proj.weight"] = w3[e]
                out[f"{prefix}.down_proj.weight"] = w2[e]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _experts_from_hf(hf_sd: dict[str, torch.Tensor], layer: int, n_experts: int) -> dict[str, torch.Tensor]:
    """Stacked w1/w3/w2 from either transformers layout: fused 3-D or one matrix per expert."""
    prefix = f"model.layers.{layer}.mlp.experts"
    if f"{prefix}.gate_up_proj" in hf_sd:  # in-memory layout: gate_up [E, 2F, D] (gate first), down [E, D, F]
        w1, w3 = hf_sd[f"{prefix}.gate_up_proj"].chunk(2, dim=1)
        w2 = hf_sd[f"{prefix}.down_proj"]
    else:  # on-disk layout written by transformers' save_pretrained
        w1, w3, w2 = (
            torch.stack([hf_sd[f"{prefix}.{e}.{name}.weight"] for e in range(n_experts)])
            for name in ("gate_proj", "up_proj", "down_proj")
        )
    ours = f"layers.{layer}.mlp.experts"
    return {f"{ours}.w1_EFD": w1, f"{ours}.w3_EFD": w3, f"{ours}.w2_EDF": w2}


def from_hf_state_dict(model: TrinityModel, hf_sd: dict[str, torch.Tensor]) -> None:
    """Load transformers-named tensors into `model` (strict: every trinity parameter must be found)."""
    sd: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": hf_sd["model.embed_tokens.weight"],
        "norm.weight": hf_sd["model.norm.weight"],
        "output.weight": hf_sd.get("lm_head.weight", hf_sd["model.embed_tokens.weight"]),
    }
    for i, block in enumerate(model.layers):
        names = dict(_LAYER_NAMES)
        names.update(_MOE_NAMES if block.is_moe else _DENSE_NAMES)
        for ours, theirs in names.items():
            sd[f"layers.{i}.{ours}"] = hf_sd[f"model.layers.{i}.{theirs}"]
        if block.is_moe:
            sd.update(_experts_from_hf(hf_sd, i, model.spec.moe.n_experts))
            sd[f"layers.{i}.mlp.expert_bias_momentum"] = torch.zeros_like(sd[f"layers.{i}.mlp.expert_bias"])
    model.load_state_dict(sd, strict=True)


def save_pretrained(model: TrinityModel, out_dir: str | Path) -> Path:
    """Write config.json and model.safetensors that `AfmoeForCausalLM.from_pretrained` loads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config_dict(model.spec)
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = to_hf_state_dict(model)
    if model.spec.tie_embeddings:
        tensors.pop("lm_head.weight")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def load_pretrained(model_dir: str | Path) -> tuple[TrinityModel, ModelSpec]:
    """A trinity model (and its spec) from a transformers afmoe directory (config + safetensors)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    spec = spec_from_hf_config(json.loads((d / "config.json").read_text()))
    hf_sd: dict[str, torch.Tensor] = {}
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{d}: no *.safetensors file; save the model with safetensors")
    for shard in shards:
        hf_sd.update(load_file(str(shard)))
    model = TrinityModel(spec)
    from_hf_state_dict(model, {k: v.float() if v.is_floating_point() else v for k, v in hf_sd.items()})
    return model, spec
