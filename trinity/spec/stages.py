"""The `stages` section: what follows pretraining, and the evaluations (PAPER.md 6-7).

Pretraining phases live in `data.phases`; each stage here continues from the one before it:
pretraining -> extend -> sft -> rl. Evals name the stage whose checkpoints they evaluate, exports the
stage whose final checkpoint they convert.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from trinity.spec.base import SpecModel, added_field, execution_only
from trinity.spec.data import MAX_COUNT, MAX_SEQ_LEN, MAX_TOKENS, ContinueLR, MixSpec
from trinity.spec.init import InitSpec
from trinity.spec.names import Name
from trinity.spec.optim import MAX_BATCH_SEQUENCES, MAX_STEPS, whole_steps
from trinity.spec.parallel import MAX_RANKS
from trinity.spec.rules import Rules


class RewarmLR(SpecModel):
    """Re-warm to a fraction of the pretraining peak, then decay linearly to 0 (Nano, Mini)."""

    kind: Literal["rewarm"] = "rewarm"
    peak_fraction: PositiveFloat = 0.1
    """Peak lr as a fraction of the pretraining peak (of each optimizer group)."""
    warmup_steps: NonNegativeInt = Field(100, le=MAX_STEPS)
    """Linear warm-up steps."""


ExtendLR = Annotated[RewarmLR | ContinueLR, Field(discriminator="kind")]


class InclusionSampling(SpecModel):
    """The paper's extension sampling (PAPER.md 6, trinity.data.inclusion): in each pass over the extension
    store, each document is included once, independently, with a probability p(length) that grows with its
    length, and the included documents are read once each in a seeded random order (without replacement).

    The curve: p = p_min up to `min_tokens`, p = p_max from `full_at_tokens` on, and in between p grows
    linearly in log(length): p_min + (p_max - p_min) x ln(len / min_tokens) / ln(full_at_tokens / min_tokens).
    The paper gives only the two end points (about 1% for short documents, up to 90% at 128K tokens); the
    log-linear shape and `min_tokens` are [open].
    """

    kind: Literal["inclusion"] = "inclusion"
    p_min: float = Field(0.01, gt=0.0, le=1.0)
    """Inclusion probability of a document of `min_tokens` tokens or fewer (> 0: every document stays reachable)."""
    p_max: float = Field(0.9, gt=0.0, le=1.0)
    """Inclusion probability of a document of `full_at_tokens` tokens or more."""
    min_tokens: PositiveInt = Field(4096, le=MAX_SEQ_LEN)
    """Length (tokens, its `<|doc|>` boundary included) up to which p = p_min; [open]: the presets' pretraining
    sequence length, the length a document that is not "long" fits in."""
    full_at_tokens: PositiveInt = Field(131_072, le=MAX_SEQ_LEN)
    """Length (tokens) from which p = p_max (the paper: 128K)."""

    @model_validator(mode="after")
    def _rules(self) -> InclusionSampling:
        rules = Rules()
        rules.check(
            self.p_min <= self.p_max,
            "p_min",
            f"= {self.p_min} must be <= p_max ({self.p_max}): the inclusion probability grows with length",
        )
        rules.check(
            self.full_at_tokens > self.min_tokens,
            "full_at_tokens",
            f"= {self.full_at_tokens} must be greater than min_tokens ({self.min_tokens}): p grows from p_min at "
            "min_tokens to p_max at full_at_tokens",
        )
        rules.raise_if_any()
        return self


DEFAULT_LONG_DOC_BIAS = 1.0
"""`long_doc_bias` when a spec does not set it (proportional to length)."""


class ExtendSpec(MixSpec):
    """Context extension: continue from the last pretraining checkpoint at a longer sequence length."""

    target_len: PositiveInt = Field(131_072, le=MAX_SEQ_LEN)
    """Context length the model is meant to serve (training may use a longer `seq_len`)."""
    global_batch_sequences: PositiveInt = Field(64, le=MAX_BATCH_SEQUENCES)
    """Sequences per optimizer step."""
    long_doc_bias: float = Field(DEFAULT_LONG_DOC_BIAS, ge=0.0, le=16.0)
    """Without `sampling`: documents are drawn, with replacement, with probability proportional to
    length**long_doc_bias (0: uniform; trinity.data.length_biased). Not used with `sampling` (where it must stay
    at its default)."""
    sampling: InclusionSampling | None = added_field(None)
    """How extension documents are sampled: `{kind: inclusion, ...}` is the paper's rule (each document once per
    pass with a probability that grows with its length, trinity.data.inclusion); None: the length-biased draw
    with replacement (`long_doc_bias`)."""
    lr: ExtendLR = RewarmLR()
    """Learning-rate rule of the stage."""
    cp: PositiveInt | None = execution_only(None, le=MAX_RANKS)
    """Context-parallel degree during extension (None: parallel.cp)."""
    changed_layers: Literal["global"] = "global"
    """Only the global (NoPE) layers are treated as changed: local RoPE theta and window stay."""
    init: InitSpec | None = None
    """Start from this checkpoint instead of the last pretraining phase's final one (trinity.spec.init)."""

    @model_validator(mode="after")
    def _rules(self) -> ExtendSpec:
        rules = Rules()
        rules.check(
            self.sampling is None or self.long_doc_bias == DEFAULT_LONG_DOC_BIAS,
            "long_doc_bias",
            f"= {self.long_doc_bias} applies only to the length-biased draw, which `sampling` replaces: remove it "
            f"(or set it to {DEFAULT_LONG_DOC_BIAS}), or remove `sampling`",
        )
        rules.raise_if_any()
        return self

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the stage: ceil(tokens / (global_batch_sequences x seq_len))."""
        return whole_steps(self.tokens, self.global_batch_sequences * self.seq_len)


class ChatJsonlSource(SpecModel):
    """Chat conversations from JSON Lines: {"messages": [{"role": ..., "content": ...}, ...]}."""

    paths: tuple[str, ...]
    """Files or glob patterns (relative to the graph file)."""


class SFTSpec(SpecModel):
    """Supervised fine-tuning on chat data, loss on assistant tokens only."""

    chat_sources: tuple[ChatJsonlSource, ...] = ()
    """Chat JSONL datasets."""
    math_conversations: NonNegativeInt = Field(2000, le=MAX_COUNT)
    """Built-in conversations from the math generator (0: none)."""
    seq_len: PositiveInt = Field(65_536, le=MAX_SEQ_LEN)
    """Packed sequence length (greedy packing, padded)."""
    tokens: PositiveInt = Field(1_000_000_000, le=MAX_TOKENS)
    """Tokens to train on (padding included)."""
    global_batch_sequences: PositiveInt = Field(64, le=MAX_BATCH_SEQUENCES)
    """Sequences per optimizer step."""
    peak_fraction: PositiveFloat = 0.1
    """Peak lr as a fraction of the pretraining peak of each group."""
    warmup_steps: NonNegativeInt = Field(50, le=MAX_STEPS)
    """Linear warm-up steps, then linear decay to 0."""
    init: InitSpec | None = None
    """Start from this checkpoint instead of the final one of extension or pretraining (trinity.spec.init)."""

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the stage: ceil(tokens / (global_batch_sequences x seq_len))."""
        return whole_steps(self.tokens, self.global_batch_sequences * self.seq_len)


class RLSpec(SpecModel):
    """Reinforcement learning with verifiable rewards: GRPO-style group-relative advantages ([open]).

    A substitute for the paper's stage (PAPER.md 7): that one is asynchronous (rollout workers beside a
    trainer) and scores with a learned reward model where no answer can be checked; neither its
    algorithm nor its reward model is public. This one alternates rollout and update in one process
    and rewards only checkable answers (exact answer and format)."""

    algorithm: Literal["grpo"] = "grpo"
    """Policy-gradient algorithm."""
    steps: PositiveInt = Field(200, le=MAX_STEPS)
    """Optimizer steps."""
    prompts_per_step: PositiveInt = Field(64, le=MAX_BATCH_SEQUENCES)
    """Distinct prompts per step."""
    group_size: PositiveInt = Field(8, le=2**16)
    """Samples per prompt; advantages are relative to the group mean."""
    max_new_tokens: PositiveInt = Field(1024, le=MAX_SEQ_LEN)
    """Longest sampled response."""
    temperature: PositiveFloat = 1.0
    """Sampling temperature of rollouts."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling threshold of rollouts."""
    clip_eps: PositiveFloat = 0.2
    """PPO-style ratio clipping."""
    kl_weight: float = Field(0.0, ge=0.0)
    """Weight of the KL penalty to the SFT policy (0: none)."""
    lr: PositiveFloat = 1e-6
    """Learning rate (both groups; constant)."""
    format_reward: float = Field(0.1, ge=0.0)
    """Reward for a well-formed answer, added to the exact-answer reward of 1."""
    init: InitSpec | None = None
    """Start the policy (and the KL reference) from this checkpoint instead of SFT's final one
    (trinity.spec.init)."""


EvalEvery = Annotated[PositiveInt, Field(le=MAX_STEPS)] | Literal["checkpoint"]
"""How often an eval also scores a stage's intermediate checkpoints while it trains: every N optimizer
steps, or `checkpoint` (every committed checkpoint: every `execution.checkpoint.every` steps)."""


class HeldoutLossEval(SpecModel):
    """Loss on documents held out of training, per source."""

    kind: Literal["heldout_loss"] = "heldout_loss"
    name: Name = "heldout"
    """Eval name (letters, digits, '.', '-', '_'); becomes part of node ids and folders."""
    after: tuple[str, ...] = ("pretrain",)
    """Stages whose final checkpoints are evaluated: 'pretrain', 'pretrain:PHASE', 'extend', 'sft', 'rl'."""
    every: EvalEvery | None = added_field(None)
    """Also evaluate the stage's intermediate checkpoints while it trains (trinity.graph.during): every this many
    optimizer steps (a multiple of execution.checkpoint.every), or `checkpoint` for every committed one; each is
    its own node `eval/NAME@STAGE@stepS`. None: the final checkpoint only."""
    seq_len: PositiveInt = Field(4096, le=MAX_SEQ_LEN)
    """Sequence length of the evaluated windows."""


class NiahEval(SpecModel):
    """MK-NIAH: several key-value needles hidden in filler; the model is asked one key's value."""

    kind: Literal["mk_niah"] = "mk_niah"
    name: Name = "mk_niah"
    """Eval name (letters, digits, '.', '-', '_'); becomes part of node ids and folders."""
    after: tuple[str, ...] = ("extend",)
    """Stages whose final checkpoints are evaluated."""
    every: EvalEvery | None = added_field(None)
    """Also evaluate the stage's intermediate checkpoints while it trains (trinity.graph.during): every this many
    optimizer steps (a multiple of execution.checkpoint.every), or `checkpoint` for every committed one; each is
    its own node `eval/NAME@STAGE@stepS`. None: the final checkpoint only."""
    lengths: tuple[Annotated[PositiveInt, Field(le=MAX_SEQ_LEN)], ...] = Field((131_072,), max_length=1024)
    """Haystack lengths, in tokens."""
    n_keys: PositiveInt = Field(4, le=2**16)
    """Needles per haystack."""
    samples: PositiveInt = Field(50, le=MAX_COUNT)
    """Haystacks per length."""


class ArithmeticEval(SpecModel):
    """Exact-match accuracy on held-out generated arithmetic."""

    kind: Literal["arithmetic"] = "arithmetic"
    name: Name = "arithmetic"
    """Eval name (letters, digits, '.', '-', '_'); becomes part of node ids and folders."""
    after: tuple[str, ...] = ("sft", "rl")
    """Stages whose final checkpoints are evaluated."""
    every: EvalEvery | None = added_field(None)
    """Also evaluate the stage's intermediate checkpoints while it trains (trinity.graph.during): every this many
    optimizer steps (a multiple of execution.checkpoint.every), or `checkpoint` for every committed one; each is
    its own node `eval/NAME@STAGE@stepS`. None: the final checkpoint only."""
    problems: PositiveInt = Field(200, le=MAX_COUNT)
    """Problems to answer (greedy decoding)."""


Eval = Annotated[HeldoutLossEval | NiahEval | ArithmeticEval, Field(discriminator="kind")]


def check_eval_every(rules: Rules, index: int, ev: Eval, checkpoint_every: int) -> None:
    """`stages.evals[index].every` must fall on committed checkpoints: a multiple of `execution.checkpoint.every`
    (a checkpoint exists only at those steps, and at a stage's last one, which the final eval reads)."""
    every = ev.every
    rules.check(
        not isinstance(every, int) or every % checkpoint_every == 0,
        ("stages", "evals", index, "every"),
        f"= {every} must be a multiple of execution.checkpoint.every ({checkpoint_every}): checkpoints are "
        f"committed only every {checkpoint_every} steps; use a multiple, or `every: checkpoint` for each of them",
    )


MAX_SHARD_BYTES = 2**50
"""Largest safetensors shard an export may ask for (1 PiB: no real limit, but a bounded field)."""


class ExportSpec(SpecModel):
    """Export a stage's final checkpoint as a transformers `AfmoeForCausalLM` directory (node `export/NAME@STAGE`).

    The node succeeds only if transformers loads the directory and its logits on `check_sequences`
    seeded random sequences agree with trinity's model of the same checkpoint within `check_atol`.
    """

    after: str
    """The stage whose final checkpoint is exported: 'pretrain', 'pretrain:PHASE', 'extend', 'sft', 'rl'."""
    format: Literal["hf"] = "hf"
    """Hugging Face transformers (afmoe): config.json, safetensors shards, tokenizer files."""
    name: Name | None = None
    """Export name in the node id `export/NAME@STAGE` (default: the format); set it when two exports of
    one stage must coexist (e.g. a float32 and a bfloat16 one)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the exported weights. float32 by default: trinity's weights are float32 masters, so the
    export is lossless; bfloat16 halves the size and rounds every weight (the check then compares with
    trinity's model holding the same rounded weights)."""
    shard_bytes: PositiveInt = Field(5_000_000_000, le=MAX_SHARD_BYTES)
    """Largest safetensors shard, in bytes (5 GB: huggingface_hub's default, transformers 4's); a single
    `model.safetensors` when everything fits, else `model-0000i-of-0000N.safetensors` and an index."""
    check_sequences: PositiveInt = Field(4, le=1024)
    """Sequences (seeded random token ids) on which trinity's and transformers' logits are compared."""
    check_atol: PositiveFloat = Field(1e-4, le=1.0)
    """Largest |logit difference| the round trip may show (float32 math on both sides)."""

    @property
    def label(self) -> str:
        """The NAME part of the node id."""
        return self.name or self.format


class StagesSpec(SpecModel):
    """The stages after pretraining, each optional, and the evals."""

    extend: ExtendSpec | None = None
    """Context extension (after the last pretraining phase)."""
    sft: SFTSpec | None = None
    """Supervised fine-tuning (after extension, or pretraining)."""
    rl: RLSpec | None = None
    """RL with verifiable rewards (after SFT)."""
    evals: tuple[Eval, ...] = Field((), max_length=1024)
    """Evaluations of stage checkpoints."""
    exports: tuple[ExportSpec, ...] = Field((), max_length=1024)
    """Exports of stage checkpoints to other formats (Hugging Face transformers)."""
