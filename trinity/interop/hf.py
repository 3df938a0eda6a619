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

`export_pretrained` is what the `export` node and `trinity export` run: a complete directory
(config, safetensors shards as transformers shards them, tokenizer files, generation config)
written under a temporary name and renamed into place only after transformers has loaded it and
its logits agree with trinity's (`check_round_trip`), so a directory at the final path is always
a checked export.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from trinity.data.tokenizer import TOKENIZER_FILE, Tokenizer
from trinity.errors import NodeFailure
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


ExportDtype = Literal["float32", "bfloat16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 5_000_000_000
"""huggingface_hub's default shard size (transformers 4's too; transformers 5 writes 50 GB shards): 5 GB
files download and resume well."""
INDEX_FILE = "model.safetensors.index.json"


def save_pretrained(
    model: TrinityModel,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write config.json and the weights that `AfmoeForCausalLM.from_pretrained` loads.

    Weights are cast to `dtype` (default: the model's) and split as transformers' save_pretrained
    splits them (`huggingface_hub.split_torch_state_dict_into_shards`): one `model.safetensors`
    when everything fits in `shard_bytes`, else `model-0000i-of-0000N.safetensors` shards and a
    `model.safetensors.index.json` mapping each tensor to its shard.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    cfg = hf_config_dict(model.spec)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in to_hf_state_dict(model).items()}
    if model.spec.tie_embeddings:
        tensors.pop("lm_head.weight")
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def write_tokenizer_files(tok: Tokenizer, out_dir: str | Path, chat: bool) -> dict[str, Any]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then encodes text as `Tokenizer.encode`
    does: the same tokenizer.json (no post-processor, so no BOS/EOS is added), and
    `split_special_tokens: true`, trinity's rule that special-token text inside a text is plain
    text (a document cannot forge a `<|doc|>`). The chat template writes trinity's
    `<|role|> content <|end|>` turns; its role markers are special-token text, so tokenize it with
    `apply_chat_template(..., tokenize=True, tokenizer_kwargs={"split_special_tokens": False})`.
    End of sequence: `<|end|>` for a chat-trained model (`chat`), else the document boundary.
    Returns the generation config written (eos and pad ids).
    """
    out = Path(out_dir)
    shutil.copyfile(tok.path, out / TOKENIZER_FILE)
    by_id = {i: t for t, i in tok.special_ids.items()}
    doc, pad = by_id[tok.doc_id], by_id[tok.pad_id]
    end = "<|end|>" if "<|end|>" in tok.special_ids else None
    eos = end if chat and end is not None else doc
    specials = {"eos_token": eos, "pad_token": pad}
    extra = [t for t in tok.special_ids if t not in specials.values()]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "bos_token": None,
        "unk_token": None,
        "additional_special_tokens": extra,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2**63 - 1,
    }
    if all(f"<|{r}|>" in tok.special_ids for r in ("system", "user", "assistant")) and end is not None:
        config["chat_template"] = (
            "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {**specials, "additional_special_tokens": extra}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    stops = sorted({tok.special_ids[eos], tok.doc_id})
    generation = {"eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": tok.pad_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return generation


def round_to(model: TrinityModel, dtype: torch.dtype) -> None:
    """Round every floating-point weight and buffer of `model` to `dtype` and back, in place: the
    float32 model that holds exactly the weights an export in `dtype` holds."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype))


def check_sequences(spec: ModelSpec, n: int, seed: int) -> torch.Tensor:
    """`n` seeded random sequences [n, T] of token ids, T = sliding_window + 16: long enough that
    local layers mask keys beyond their window."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (n, spec.sliding_window + 16), generator=generator)


def check_round_trip(model: TrinityModel, hf_dir: str | Path, ids_NT: torch.Tensor) -> float:
    """Max |logit difference| between `model` and `AfmoeForCausalLM.from_pretrained(hf_dir)` on `ids_NT`.

    Both sides compute in float32 on the CPU (transformers loads the export upcast to float32), so
    for a bfloat16 export pass the model rounded with `round_to`: the comparison is then of the
    mapping alone, on the same weights, not of bfloat16 arithmetic. One sequence at a time.
    """
    from transformers import AfmoeForCausalLM

    hf: torch.nn.Module = AfmoeForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf.eval()
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for n in range(ids_NT.shape[0]):
            ids_1T = ids_NT[n : n + 1]
            ours_1TV = model(ids_1T).logits.float()
            theirs_1TV = hf(ids_1T).logits.float()
            worst = max(worst, (ours_1TV - theirs_1TV).abs().max().item())
    return worst


@dataclass(frozen=True)
class ExportCheck:
    """What a round-trip check compared and found."""

    sequences: int
    tokens_per_sequence: int
    atol: float
    max_abs_diff: float


def export_pretrained(
    model: TrinityModel,
    tok: Tokenizer,
    out_dir: str | Path,
    *,
    chat: bool,
    dtype: ExportDtype = "float32",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    sequences: int = 4,
    atol: float = 1e-4,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export `model` and `tok` to `out_dir` (absent, or an empty folder) and check the round trip.

    Everything is written to a sibling temporary folder, loaded back with transformers and
    compared (`check_round_trip`); only if the largest logit difference is within `atol` is the
    folder renamed to `out_dir`. Otherwise it is removed and NodeFailure names the difference.
    `model` is rounded in place to `dtype`. Returns what was exported and the measured difference.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NodeFailure(f"{out} exists and is not an empty folder; export into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        torch_dtype = DTYPES[dtype]
        round_to(model, torch_dtype)
        save_pretrained(model, tmp, torch_dtype, shard_bytes)
        generation = write_tokenizer_files(tok, tmp, chat)
        ids_NT = check_sequences(model.spec, sequences, seed)
        diff = check_round_trip(model, tmp, ids_NT)
        check = ExportCheck(sequences, int(ids_NT.shape[1]), atol, diff)
        if not diff <= atol:  # NaN fails too
            raise NodeFailure(
                f"the exported model does not reproduce trinity's: max |logit difference| {diff:.3g} > {atol:g} "
                f"on {sequences} sequences of {ids_NT.shape[1]} tokens; nothing was exported"
            )
        files = sorted(p.name for p in tmp.iterdir())
        os.replace(tmp, out)  # an empty `out` is replaced: the folder appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "format": "hf",
        "dtype": dtype,
        "shards": sum(f.endswith(".safetensors") for f in files),
        "bytes": sum((out / f).stat().st_size for f in files),
        "files": files,
        "check": asdict(check),
        "generation": generation,
        **(extra or {}),
    }


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
