"""The micro graph of tests/execute with every post-training stage and eval added (seconds per node)."""

from __future__ import annotations

from tests.execute.conftest import MICRO_GRAPH

STAGES = """\
stages:
  extend:
    tokens: 8192
    seq_len: 128
    target_len: 128
    global_batch_sequences: 4
    mix: {docs: 1.0, math: 1.0}
    long_doc_bias: 1.0
    loader: {kind: sequential}
    lr: {kind: rewarm, peak_fraction: 0.1, warmup_steps: 2}
  sft: {math_conversations: 200, seq_len: 128, tokens: 8192, global_batch_sequences: 8, peak_fraction: 0.1,
        warmup_steps: 2}
  rl: {steps: 6, prompts_per_step: 4, group_size: 4, max_new_tokens: 16, temperature: 1.0, clip_eps: 0.2,
       kl_weight: 0.01, lr: 1.0e-4}
  evals:
    - {kind: heldout_loss, after: [pretrain, extend], seq_len: 64}
    - {kind: mk_niah, after: [pretrain, extend], lengths: [96, 128], n_keys: 2, samples: 4}
    - {kind: arithmetic, after: [sft, rl], problems: 16}
"""

POST_GRAPH = MICRO_GRAPH.replace("    extra: {kind: jsonl, paths: [extra.jsonl]}\n", "").replace(
    "execution:\n", STAGES + "execution:\n"
)
