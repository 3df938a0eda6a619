"""The Trinity transformer: sandwich-norm layers, embedding x sqrt(d), final norm, untied head.

Reads top to bottom: TransformerBlock, TrinityModel (built from a ModelSpec alone), init_weights.

Legend: B batch, T sequence, D d_model, V vocabulary, L MoE layers, E routed experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trinity.model.attention import Attention, AttentionMasks, build_attention_masks
from trinity.model.head_loss import GradRatio, head_cross_entropy_and_z
from trinity.model.init import fill_constant, fill_truncated_normal
from trinity.model.losses import cross_entropy_and_z
from trinity.model.moe import MoE, SwiGLU
from trinity.model.norm import RMSNorm
from trinity.model.output import TrinityOutput
from trinity.model.rope import RotaryEmbedding
from trinity.spec.model import ModelSpec


class TransformerBlock(nn.Module):
    """x = x + post_attn_norm(attn(attn_norm(x))); x = x + post_mlp_norm(mlp(mlp_norm(x))).

    The post norms (initialised to 1/sqrt(n_layers)) bound what each sublayer adds to the stream.
    """

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.is_moe = spec.is_moe_layer(layer)
        eps = spec.norm_eps
        self.attn_norm = RMSNorm(spec.d_model, eps)
        self.attn = Attention(
            spec.d_model,
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim,
            is_local=spec.attention_types()[layer] == "local",
            qk_norm=spec.qk_norm,
            gated=spec.gated_attention,
            norm_eps=eps,
        )
        self.post_attn_norm = RMSNorm(spec.d_model, eps)
        self.mlp_norm = RMSNorm(spec.d_model, eps)
        self.mlp: MoE | SwiGLU
        if self.is_moe:
            m = spec.moe
            self.mlp = MoE(
                spec.d_model,
                m.n_experts,
                m.top_k,
                m.expert_hidden,
                m.n_shared_experts,
                m.route_scale,
                m.score_function,
                m.normalize_gates,
            )
        else:
            self.mlp = SwiGLU(spec.d_model, spec.dense_hidden)
        self.post_mlp_norm = RMSNorm(spec.d_model, eps)

    def forward(
        self, x_BTD: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor], masks: AttentionMasks
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x_BTD = x_BTD + self.post_attn_norm(self.attn(self.attn_norm(x_BTD), rope_cos_sin, masks))
        h_BTD = self.mlp_norm(x_BTD)
        if isinstance(self.mlp, MoE):
            y_BTD, counts_E, aux = self.mlp(h_BTD)
            return x_BTD + self.post_mlp_norm(y_BTD), counts_E, aux
        return x_BTD + self.post_mlp_norm(self.mlp(h_BTD)), None, None


class TrinityModel(nn.Module):
    """Decoder-only sparse MoE language model, single device, configured by a ModelSpec."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.d_model)
        self.rope = RotaryEmbedding(spec.head_dim, spec.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.output = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.embed_scale = math.sqrt(spec.d_model) if spec.embedding_scale == "sqrt_d_model" else 1.0
        # The fused head loss's guess of g_z / g_ce for its precomputed gradient (head_loss.py).
        self.head_grad_ratio = GradRatio()
        init_weights(self)  # nothing on the meta device: materialise (to_empty), then init_weights

    def moe_layers(self) -> list[MoE]:
        """The MoE modules in layer order (row l of expert_counts belongs to the l-th)."""
        return [block.mlp for block in self.layers if isinstance(block.mlp, MoE)]

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
        labels_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> TrinityOutput:
        """One pass over a batch.

        doc_ids_BT: document id (>= 0) of each token of a packed sequence; when given, attention
            stays within documents (intra-document masking). None: one document per row.
        position_ids_BT: RoPE positions; None means 0..T-1. For positions that restart at each
            document pass `trinity.model.rope.positions_from_doc_ids(doc_ids_BT)`.
        labels_BT: next-token targets (already shifted), -100 = ignore.
        return_logits: with labels, compute the [B, T, V] logits in the forward and the loss from
            them (the unfused path). By default the head is fused with the loss and the logits are
            never built (TrinityOutput.logits computes them on access). Without labels the logits
            are always computed.
        """
        B, T = input_ids_BT.shape
        x_BTD = self.tok_embeddings(input_ids_BT) * self.embed_scale
        if position_ids_BT is None:
            position_ids_BT = torch.arange(T, device=input_ids_BT.device)[None].expand(B, T)
        rope_cos_sin = self.rope(position_ids_BT, x_BTD.dtype)
        masks = build_attention_masks(T, self.spec.sliding_window, doc_ids_BT)

        counts, auxes = [], []
        for block in self.layers:
            x_BTD, counts_E, aux = block(x_BTD, rope_cos_sin, masks)
            if counts_E is not None and aux is not None:
                counts.append(counts_E)
                auxes.append(aux)
        h_BTD = self.norm(x_BTD)
        head_VD = self.output.weight

        ce = z = logits_BTV = None
        if labels_BT is None or return_logits:
            logits_BTV = self.output(h_BTD)
            if labels_BT is not None:
                ce, z = cross_entropy_and_z(logits_BTV, labels_BT)
        else:
            h_ND = h_BTD.reshape(B * T, -1)
            ce, z = head_cross_entropy_and_z(h_ND, head_VD, labels_BT.reshape(-1), self.head_grad_ratio)
        E = self.spec.moe.n_experts
        dev = input_ids_BT.device
        expert_counts = torch.stack(counts) if counts else torch.zeros(0, E, dtype=torch.long, device=dev)
        aux_per_layer = torch.stack(auxes) if auxes else torch.zeros(0, device=dev)
        return TrinityOutput(ce, z, expert_counts, aux_per_layer, h_BTD, head_VD, logits_BTV)


@torch.no_grad()
def init_weights(model: TrinityModel, seed: int | None = None) -> None:
    """Initialise every parameter and buffer of `model` from its spec, whatever its layout.

    Scheme (PAPER.md 1-2, ModelSpec.init):
    - every weight matrix: embedding, q/k/v/gate/o projections, dense and shared SwiGLU, router,
      each expert's stacked w1/w3/w2, and the LM head: truncated normal, mean 0,
      std = init.std or init.std_factor / sqrt(d_model) (0.5/sqrt(d) by default), cut at
      +- init.truncation x std;
    - RMSNorm gains: 1 for the input norms (attn_norm, mlp_norm), q/k norms and the final norm;
      1/sqrt(n_layers) for the post norms (post_attn_norm, post_mlp_norm);
    - expert bias and its SMEBU momentum: 0 (fp32); RoPE inverse frequencies recomputed; the fused
      head loss's gradient-ratio guess back to 0.

    The random values come from trinity.model.init: each element's draw depends only on (seed,
    parameter name, its index in the full parameter), so a model sharded over any number of ranks
    (DTensor parameters: each rank fills only its shard) gets the same full weights as one
    process. `seed` None draws one from torch's global generator (so `torch.manual_seed(s);
    TrinityModel(spec)` stays reproducible). A model on the meta device is left as is.
    """
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    spec = model.spec
    std = spec.init.resolved_std(spec.d_model)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fill_truncated_normal(p, seed, name, std, spec.init.truncation)
        elif name.endswith(("post_attn_norm.weight", "post_mlp_norm.weight")):
            fill_constant(p, 1.0 / math.sqrt(spec.n_layers))
        else:
            fill_constant(p, 1.0)
    model.rope.reset_buffers()
    for moe in model.moe_layers():
        moe.expert_bias.zero_()
        moe.expert_bias_momentum.zero_()
    model.head_grad_ratio.value = 0.0
