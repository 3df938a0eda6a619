"""The `model` section: the architecture of a Trinity-style sparse MoE transformer (PAPER.md 1-2)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from trinity.spec.base import SpecModel
from trinity.spec.data import MAX_SEQ_LEN
from trinity.spec.rules import Rules

LayerType = Literal["local", "global"]

# Upper bounds on the architecture: several times the largest published models, low enough that
# estimates and per-layer lists stay instant and the counts stay exact.
MAX_LAYERS = 1024
MAX_WIDTH = 2**17
"""d_model, head_dim and hidden widths (largest published d_model: ~25k)."""
MAX_VOCAB = 2**24
MAX_HEADS = 1024
MAX_EXPERTS = 2**14


class MoESpec(SpecModel):
    """Routed experts, the shared expert and the router of every MoE layer."""

    n_experts: PositiveInt = Field(128, le=MAX_EXPERTS)
    """Routed experts per MoE layer."""
    n_shared_experts: int = Field(1, ge=0, le=MAX_EXPERTS)
    """Always-on shared SwiGLU experts added to the routed output (Trinity uses 1)."""
    top_k: PositiveInt = 8
    """Routed experts selected per token (on score + expert bias)."""
    expert_hidden: PositiveInt = Field(256, le=MAX_WIDTH)
    """Hidden width of each routed (and shared) expert's SwiGLU."""
    route_scale: PositiveFloat = 2.826
    """Gates (normalised over the top-k) are multiplied by this."""
    score_function: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router score function; Trinity uses sigmoid, computed in fp32."""
    normalize_gates: bool = True
    """Normalise the selected experts' unbiased scores to sum to 1 before `route_scale`."""

    @model_validator(mode="after")
    def _rules(self) -> MoESpec:
        rules = Rules()
        rules.check(
            self.top_k <= self.n_experts,
            "top_k",
            f"= {self.top_k} must be <= n_experts ({self.n_experts})",
        )
        rules.raise_if_any()
        return self


class InitSpec(SpecModel):
    """Weight initialisation rule (PAPER.md 1: truncated normal, std 0.5/sqrt(d_model), +-3 std)."""

    kind: Literal["truncated_normal"] = "truncated_normal"
    """Distribution of every weight matrix and the embedding."""
    std: PositiveFloat | None = None
    """Standard deviation; None means 0.5 / sqrt(d_model)."""
    std_factor: PositiveFloat = 0.5
    """With `std` unset: std = std_factor / sqrt(d_model)."""
    truncation: PositiveFloat = 3.0
    """Samples are truncated to +- truncation x std."""

    def resolved_std(self, d_model: int) -> float:
        """The standard deviation used for a model of width `d_model`."""
        return self.std if self.std is not None else self.std_factor / math.sqrt(d_model)


class ModelSpec(SpecModel):
    """Architecture of the transformer: attention, dense and MoE feed-forward layers."""

    vocab_size: PositiveInt = Field(200_192, le=MAX_VOCAB)
    """Embedding and LM-head rows (the tokenizer's vocabulary, padded)."""
    d_model: PositiveInt = Field(1024, le=MAX_WIDTH)
    """Residual stream width."""
    n_layers: PositiveInt = Field(56, le=MAX_LAYERS)
    """Transformer layers in total."""
    n_dense_layers: int = Field(2, ge=0)
    """The first `n_dense_layers` layers use a dense SwiGLU; the rest are MoE."""
    n_heads: PositiveInt = Field(8, le=MAX_HEADS)
    """Query heads."""
    n_kv_heads: PositiveInt = Field(2, le=MAX_HEADS)
    """Key/value heads (grouped-query attention); must divide n_heads."""
    head_dim: PositiveInt = Field(128, le=MAX_WIDTH)
    """Width of each head; the attention inner width is n_heads x head_dim, not d_model."""
    dense_hidden: PositiveInt = Field(3072, le=MAX_WIDTH)
    """Hidden width of the dense layers' SwiGLU."""
    global_every: PositiveInt | None = Field(4, le=MAX_LAYERS)
    """Layer i (0-based) is global if (i+1) % global_every == 0, else local. Ignored if `layer_types` is set."""
    layer_types: tuple[LayerType, ...] | None = Field(None, max_length=MAX_LAYERS)
    """Explicit attention type per layer ('local' or 'global'); overrides `global_every`."""
    sliding_window: PositiveInt = Field(2048, le=MAX_SEQ_LEN)
    """Local layers attend to the last `sliding_window` tokens, the current one included."""
    rope_theta: PositiveFloat = 10_000.0
    """RoPE base of the local layers (global layers use no positional encoding)."""
    qk_norm: bool = True
    """Per-head RMSNorm on queries and keys (weights shared across heads)."""
    gated_attention: bool = True
    """Elementwise sigmoid gate on the attention output, from the layer's normed input."""
    embedding_scale: Literal["sqrt_d_model", "none"] = "sqrt_d_model"
    """Multiply the embedding output by sqrt(d_model) (Trinity) or leave it."""
    tie_embeddings: bool = False
    """Share the embedding and LM-head matrix (Trinity: untied)."""
    norm_eps: PositiveFloat = 1e-5
    """RMSNorm epsilon (RMSNorm computes in fp32)."""
    init: InitSpec = InitSpec()
    """Weight initialisation."""
    moe: MoESpec = MoESpec()
    """The MoE layers."""

    @model_validator(mode="after")
    def _rules(self) -> ModelSpec:
        rules = Rules()
        rules.check(
            self.n_heads % self.n_kv_heads == 0,
            "n_heads",
            f"= {self.n_heads} must be divisible by n_kv_heads ({self.n_kv_heads})",
        )
        rules.check(
            self.n_dense_layers <= self.n_layers,
            "n_dense_layers",
            f"= {self.n_dense_layers} must be <= n_layers ({self.n_layers})",
        )
        if self.layer_types is not None:
            rules.check(
                len(self.layer_types) == self.n_layers,
                "layer_types",
                f"has {len(self.layer_types)} entries; must have one per layer (n_layers = {self.n_layers})",
            )
        elif self.global_every is None:
            rules.check(False, "global_every", "must be set when layer_types is not given")
        rules.raise_if_any()
        return self

    def attention_types(self) -> tuple[LayerType, ...]:
        """'local' or 'global' for each layer, in order."""
        if self.layer_types is not None:
            return self.layer_types
        every = self.global_every or 1
        return tuple("global" if (i + 1) % every == 0 else "local" for i in range(self.n_layers))

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) has an MoE feed-forward."""
        return layer >= self.n_dense_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def attn_width(self) -> int:
        """Width of the query (and gate) projection: n_heads x head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of the key and value projections: n_kv_heads x head_dim."""
        return self.n_kv_heads * self.head_dim
