"""The Trinity model: single-device, built from a ModelSpec alone (PAPER.md 2)."""

from trinity.model.attention import Attention, AttentionMasks, build_attention_masks
from trinity.model.losses import IGNORE_INDEX, cross_entropy_and_z, sequence_aux_loss, z_loss
from trinity.model.moe import MoE, MoEReference, SwiGLU
from trinity.model.norm import RMSNorm
from trinity.model.output import TrinityOutput
from trinity.model.rope import RotaryEmbedding, apply_rope, positions_from_doc_ids
from trinity.model.transformer import TransformerBlock, TrinityModel, init_weights

__all__ = [
    "IGNORE_INDEX",
    "Attention",
    "AttentionMasks",
    "MoE",
    "MoEReference",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "TrinityModel",
    "TrinityOutput",
    "apply_rope",
    "build_attention_masks",
    "cross_entropy_and_z",
    "init_weights",
    "positions_from_doc_ids",
    "sequence_aux_loss",
    "z_loss",
]
