"""Cost of an experiment from its spec alone: parameters, FLOPs, memory per GPU, checkpoint size, GPU-hours.

Conventions (printed by `trinity plan`, checked against PAPER.md's counts in the tests):
- Parameters count every weight the model trains: embedding, attention (q, k, v, gate, o, the
  per-head QK-norm gains), the four sandwich norms, dense SwiGLU or MoE (router, routed and
  shared experts), final norm and head. The expert bias is a buffer, not a parameter.
- Active parameters per token count top-k routed experts instead of all of them. "Non-embedding"
  leaves out the embedding and the LM head.
- Training FLOPs per token = 6 x (active matmul parameters, head included, embedding lookup
  excluded) + 12 x heads x head_dim x mean attended context, summed over layers: a local layer
  attends to at most `sliding_window` keys, a global one to (T+1)/2 on average (causal). The
  context is an upper bound under intra-document masking.
- Memory per GPU under HSDP, per training stage: fp32 master weights, fp32 gradients and optimizer
  state (Muon: one momentum; AdamW: two moments) sharded over the FSDP group (experts over EP
  inside it); plus the gathered parameters in the compute dtype: the root's (embedding and head,
  kept from forward to backward) and one transformer block; plus
  activations of one micro-batch in the compute dtype (block inputs kept, and one block recomputed
  with as much again for its backward temporaries, with activation checkpointing; all blocks
  without), at the sequence length divided by context parallelism; plus the larger of two
  transients that never coincide: one block's gradients in the compute and the reduce dtype (its
  backward), or what the fused head loss holds (trinity/model/head_loss.py: the fp32 head gradient
  it computes in the forward, its [chunk, V] buffers; the [B, T, V] logits are never built).
  `trinity plan --trace` checks these figures against one traced step of the real code
  (trinity/distributed/trace.py): within 15% for the presets' pretraining.
- GPU-hours = FLOPs / (peak bf16 FLOP/s x declared MFU) / 3600.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from trinity.spec.experiment import ExperimentSpec
from trinity.spec.model import ModelSpec
from trinity.spec.parallel import ParallelSpec

BYTES_FP32 = 4
BYTES_BF16 = 2


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model, split the way the estimates need them."""

    embedding: int
    head: int
    attention: int
    norms: int
    dense_ffn: int
    router: int
    routed_experts: int
    shared_experts: int
    active_routed_experts: int

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.head
            + self.attention
            + self.norms
            + self.dense_ffn
            + self.router
            + self.routed_experts
            + self.shared_experts
        )

    @property
    def active_non_embedding(self) -> int:
        """Active per token, without embedding and head."""
        return (
            self.attention
            + self.norms
            + self.dense_ffn
            + self.router
            + self.shared_experts
            + self.active_routed_experts
        )

    @property
    def active(self) -> int:
        """Active per token, with embedding and head."""
        return self.active_non_embedding + self.embedding + self.head

    @property
    def muon_params(self) -> int:
        """Hidden matrices (Muon's group; the router is counted with AdamW here)."""
        return self.attention_matrices + self.dense_ffn + self.routed_experts + self.shared_experts

    @property
    def attention_matrices(self) -> int:
        return self.attention - self.qk_norm_params

    qk_norm_params: int = 0


def count_params(m: ModelSpec) -> ParamCounts:
    """Count the parameters of the model `m` describes (see the module docstring)."""
    d, moe = m.d_model, m.moe
    qk_norm = 2 * m.head_dim if m.qk_norm else 0
    gate = d * m.attn_width if m.gated_attention else 0
    attn_layer = d * m.attn_width * 2 + d * m.kv_width * 2 + gate + qk_norm  # q, o, k, v, gate, norms
    expert = 3 * d * moe.expert_hidden
    head = 0 if m.tie_embeddings else m.vocab_size * d
    return ParamCounts(
        embedding=m.vocab_size * d,
        head=head,
        attention=attn_layer * m.n_layers,
        norms=4 * d * m.n_layers + d,
        dense_ffn=3 * d * m.dense_hidden * m.n_dense_layers,
        router=d * moe.n_experts * m.n_moe_layers,
        routed_experts=expert * moe.n_experts * m.n_moe_layers,
        shared_experts=expert * moe.n_shared_experts * m.n_moe_layers,
        active_routed_experts=expert * moe.top_k * m.n_moe_layers,
        qk_norm_params=qk_norm * m.n_layers,
    )


def mean_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to, causal, optionally within a sliding window."""
    t = seq_len
    if window is None or window >= t:
        return (t + 1) / 2
    w = window
    return (w * (w + 1) / 2 + (t - w) * w) / t


def flops_per_token(m: ModelSpec, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`."""
    c = count_params(m)
    matmul = c.active_non_embedding - c.norms - c.qk_norm_params + c.head
    attn = 0.0
    for kind in m.attention_types():
        ctx = mean_context(seq_len, m.sliding_window if kind == "local" else None)
        attn += 12 * m.n_heads * m.head_dim * ctx
    return 6 * matmul + attn


def _optimizer_state_bytes(c: ParamCounts) -> int:
    """Muon keeps one fp32 momentum per matrix parameter; AdamW two fp32 moments for the rest."""
    muon = c.muon_params
    return muon * BYTES_FP32 + (c.total - muon) * 2 * BYTES_FP32


def _block_activation_bytes_per_token(m: ModelSpec, moe: bool) -> float:
    """bf16 activations one block keeps for backward, per token (norm outputs, projections, FFN)."""
    d = m.d_model
    attn = 6 * d + 3 * m.attn_width + 2 * m.kv_width  # norms, residuals, q, gate, attn-out, k, v
    if moe:
        h, k = m.moe.expert_hidden, m.moe.top_k
        ffn = 4 * d + k * (d + 3 * h) + m.moe.n_shared_experts * 3 * h + 2 * m.moe.n_experts
    else:
        ffn = 4 * d + 3 * m.dense_hidden
    return float((attn + ffn) * BYTES_BF16)


HEAD_CHUNK_BYTES = 64 * 2**20
HEAD_HELD_BYTES = 256 * 2**20
"""The fused head loss's caps on its fp32 [chunk, V] buffer and its held logit gradients
(trinity/model/head_loss.py MAX_CHUNK_BYTES, MAX_GRAD_ROWS_BYTES; graph/ may not import model/)."""


def _head_loss_bytes(m: ModelSpec, tokens: float, compute_bytes: int) -> float:
    """What the fused head loss holds at once: the fp32 head gradient it computes in the forward (kept
    for the backward), its chunk buffers (fp32 and compute-dtype [C, V], held logit gradients) and the
    gradient w.r.t. the hidden states. The [B, T, V] logits are never built."""
    V, d = m.vocab_size, m.d_model
    buffers = HEAD_CHUNK_BYTES * (1 + compute_bytes / BYTES_FP32) + min(HEAD_HELD_BYTES, tokens * V * compute_bytes)
    return V * d * BYTES_FP32 + buffers + tokens * d * compute_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by kind (see the module docstring)."""

    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    block_grads: int
    head_loss: int

    @property
    def total(self) -> int:
        # A block's gradients live in its backward, the head loss's buffers at the head: never both.
        held = self.params + self.grads + self.optimizer + self.gathered + self.activations
        return held + max(self.block_grads, self.head_loss)


def memory_per_gpu(
    m: ModelSpec, par: ParallelSpec, seq_len: int, cp: int | None = None, precision: str = "bf16"
) -> MemoryEstimate:
    """Training memory per GPU at `seq_len` under the layout `par` (see the module docstring)."""
    c = count_params(m)
    shard = par.fsdp_group
    compute_bytes = BYTES_BF16 if par.param_dtype == "bf16" and precision == "bf16" else BYTES_FP32
    act_bytes = BYTES_BF16 if precision == "bf16" else BYTES_FP32
    reduce_bytes = BYTES_BF16 if par.reduce_dtype == "bf16" else BYTES_FP32
    per_layer_dense = (c.attention + c.norms + c.dense_ffn) / m.n_layers
    expert_layer = (c.routed_experts / max(m.n_moe_layers, 1)) / par.ep
    shared_layer = (c.shared_experts + c.router) / max(m.n_moe_layers, 1)
    block = per_layer_dense + (expert_layer + shared_layer if m.n_moe_layers else 0)
    root = c.embedding + c.head
    tokens = par.micro_batch * seq_len / (cp or par.cp)
    per_token = [
        _block_activation_bytes_per_token(m, m.is_moe_layer(i)) / BYTES_BF16 * act_bytes for i in range(m.n_layers)
    ]
    if par.activation_checkpointing != "none":
        # Block inputs kept; one block recomputed in the backward, with its gradient temporaries.
        activations = tokens * (m.n_layers * m.d_model * act_bytes + 2 * max(per_token))
    else:
        activations = tokens * sum(per_token)
    return MemoryEstimate(
        params=math.ceil(c.total * BYTES_FP32 / shard),
        grads=math.ceil(c.total * BYTES_FP32 / shard),
        optimizer=math.ceil(_optimizer_state_bytes(c) / shard),
        gathered=math.ceil((root + block) * compute_bytes),
        activations=math.ceil(activations),
        block_grads=math.ceil(block * (compute_bytes + reduce_bytes)),
        head_loss=math.ceil(_head_loss_bytes(m, tokens, compute_bytes)),
    )


def checkpoint_bytes(m: ModelSpec) -> int:
    """A full training checkpoint: fp32 weights, optimizer state, expert bias and momentum."""
    c = count_params(m)
    balancing = 2 * m.moe.n_experts * m.n_moe_layers * BYTES_FP32
    return c.total * BYTES_FP32 + _optimizer_state_bytes(c) + balancing


@dataclass(frozen=True)
class StageCost:
    """Tokens, optimizer steps, FLOPs and GPU-hours of one stage."""

    stage: str
    tokens: int
    seq_len: int
    steps: int
    flops: float
    gpu_hours: float


@dataclass(frozen=True)
class Estimates:
    """Everything `trinity plan` reports about cost."""

    total_params: int
    active_params: int
    active_params_non_embedding: int
    flops_per_token: float
    memory_per_gpu_bytes: int
    """Pretraining's (at the longest phase), the figure `plan --trace` checks."""
    memory_breakdown: dict[str, int]
    memory_fits: bool
    checkpoint_bytes: int
    gpu_hours: float
    world_size: int
    stages: list[StageCost] = field(default_factory=list)
    memory_per_stage_bytes: dict[str, int] = field(default_factory=dict)
    """Every training stage's (extension at its context-parallel degree); `memory_fits` means all fit."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def estimate(spec: ExperimentSpec) -> Estimates:
    """Estimates for the whole experiment (memory: pretraining's, and per training stage)."""
    m, par = spec.model, spec.parallel
    c = count_params(m)
    peak = par.accelerator.peak_bf16_tflops * 1e12 * par.mfu

    def cost(stage: str, tokens: int, seq_len: int, steps: int, flops_per_tok: float) -> StageCost:
        flops = flops_per_tok * tokens
        return StageCost(stage, tokens, seq_len, steps, flops, flops / peak / 3600)

    stages = [
        cost(f"pretrain:{p.name}", p.tokens, p.seq_len, n, flops_per_token(m, p.seq_len))
        for p, n in zip(spec.data.phases, spec.pretrain_steps(), strict=True)
    ]
    precision = spec.stability.precision
    memory = memory_per_gpu(m, par, spec.data.max_seq_len, precision=precision)
    per_stage = {"pretrain": memory.total}
    if (ext := spec.stages.extend) is not None:
        stages.append(cost("extend", ext.tokens, ext.seq_len, ext.optimizer_steps, flops_per_token(m, ext.seq_len)))
        per_stage["extend"] = memory_per_gpu(m, par, ext.seq_len, ext.cp, precision).total
    if (sft := spec.stages.sft) is not None:
        stages.append(cost("sft", sft.tokens, sft.seq_len, sft.optimizer_steps, flops_per_token(m, sft.seq_len)))
        per_stage["sft"] = memory_per_gpu(m, par, sft.seq_len, precision=precision).total
    if (rl := spec.stages.rl) is not None:
        # Upper bound: every response at max length; generation 2N, policy update 6N per token.
        tokens = rl.steps * rl.prompts_per_step * rl.group_size * rl.max_new_tokens
        per_token = flops_per_token(m, rl.max_new_tokens) * 8 / 6
        stages.append(cost("rl", tokens, rl.max_new_tokens, rl.steps, per_token))
    breakdown = {k: v for k, v in asdict(memory).items()}
    return Estimates(
        total_params=c.total,
        active_params=c.active,
        active_params_non_embedding=c.active_non_embedding,
        flops_per_token=flops_per_token(m, spec.data.max_seq_len),
        memory_per_gpu_bytes=memory.total,
        memory_breakdown=breakdown,
        memory_per_stage_bytes=per_stage,
        memory_fits=max(per_stage.values()) <= par.accelerator.memory_gib * 1024**3,
        checkpoint_bytes=checkpoint_bytes(m),
        gpu_hours=sum(s.gpu_hours for s in stages),
        world_size=par.total_ranks,
        stages=stages,
    )
