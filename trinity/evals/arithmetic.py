"""Held-out generated arithmetic: exact-match accuracy of greedy answers (and the RL reward on them).

Held-out problems come from their own seed tag and exclude every prompt the experiment trains on
(the built-in SFT conversations and all RL steps' problems): the generator has small families
(e.g. a^n with a <= 12, n <= 5) where repeats are likely.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from trinity.data.chat import ChatTokenizer, math_sft_problems, user_prompt
from trinity.data.mathgen import Problem, generate
from trinity.model import TrinityModel
from trinity.model.generate import generate_with_logprobs
from trinity.rl.rollout import rl_problems, score, stop_ids
from trinity.spec.experiment import ExperimentSpec

HELDOUT_SEED = 0xE7A
MAX_NEW_TOKENS = 64
"""Longest greedy answer; the generator's worked solutions are shorter."""


def heldout_problems(seed: int, n: int, exclude: Iterable[str] = ()) -> list[Problem]:
    """`n` problems of the held-out stream whose prompts are not in `exclude`."""
    skip = set(exclude)
    rng = np.random.default_rng([seed, HELDOUT_SEED])
    out: list[Problem] = []
    for _ in range(200 * n + 1000):
        p = generate(rng)
        if p.prompt not in skip:
            out.append(p)
            skip.add(p.prompt)  # no duplicates within the set either
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} held-out problems distinct from {len(skip)} training prompts")


def trained_prompts(spec: ExperimentSpec) -> set[str]:
    """Every math prompt the experiment's SFT and RL stages train on."""
    prompts: set[str] = set()
    if (sft := spec.stages.sft) is not None:
        prompts |= {p.prompt for p in math_sft_problems(spec.seed, sft.math_conversations)}
    if (rl := spec.stages.rl) is not None:
        for step in range(rl.steps):
            prompts |= {p.prompt for p in rl_problems(spec.seed, step, rl.prompts_per_step)}
    return prompts


@torch.no_grad()
def evaluate_arithmetic(
    model: TrinityModel,
    tok: ChatTokenizer,
    problems: list[Problem],
    format_reward: float = 0.1,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch: int = 32,
) -> dict[str, Any]:
    """Greedy answers to the chat-formatted problems: accuracy, format rate, mean RL reward, length."""
    correct, formatted, rewards, lengths = [], [], [], []
    examples: list[dict[str, str]] = []
    for a in range(0, len(problems), batch):
        chunk = problems[a : a + batch]
        gen = generate_with_logprobs(
            model,
            [user_prompt(tok, p.prompt) for p in chunk],
            max_new_tokens,
            stop_ids=stop_ids(tok),
            pad_id=tok.pad_id,
        )
        for p, ids, stopped in zip(chunk, gen.tokens, gen.stopped, strict=True):
            text = tok.decode(ids[:-1] if stopped else ids)
            r, c, f = score(p, text, stopped, format_reward)
            correct.append(c)
            formatted.append(f)
            rewards.append(r)
            lengths.append(len(ids))
            if len(examples) < 5:
                examples.append({"prompt": p.prompt, "answer": p.answer, "response": text})
    n = max(len(problems), 1)
    return {
        "accuracy": sum(correct) / n,
        "format_rate": sum(formatted) / n,
        "reward": sum(rewards) / n,
        "response_length": sum(lengths) / n,
        "n": len(problems),
        "examples": examples,
    }
