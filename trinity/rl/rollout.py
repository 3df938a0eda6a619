"""RL rollouts with verifiable rewards: sample a group of responses per math problem and grade them.

The rollout side of RL: it needs a policy to sample from and nothing of the trainer (optimizer,
reference model, loss), so it could run in separate worker processes that receive weights.

Prompt: the chat template's user turn with the problem, then `<|assistant|>`. Each prompt is
sampled `group_size` times (temperature, top-p); a response ends at `<|end|>` or after
`max_new_tokens`. Rewards (PAPER.md 7: exact answer and format checks):
- exact: 1 if `mathgen.check(answer, response)` (the number after the last `Answer:`, else the
  last number, equals the exact answer as a rational), else 0;
- format: `format_reward` if the response is well formed: it closed with a stop token (`<|end|>`,
  or `<|doc|>`, the end of text a pretrained model knows; not cut off) and contains an
  `Answer: <number>` line, else 0.
reward = exact + format.

Problems are deterministic in (seed, step), as is the sampling generator, so a resumed run draws
the same rollouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from trinity.data.chat import ChatTokenizer, role_id, user_prompt
from trinity.data.mathgen import Problem, check, generate
from trinity.model import TrinityModel
from trinity.model.generate import generate_with_logprobs

RL_SEED = 0x7B1
"""Seed tag of RL training problems (SFT uses 0x5F7, held-out evals 0xE7A)."""
FORMAT_RE = re.compile(r"Answer:\s*-?[\d,]+(?:\.\d+)?(?:\s*/\s*-?\d+)?")


def rl_problems(seed: int, step: int, n: int) -> list[Problem]:
    """The `n` training problems of RL step `step` (0-based)."""
    rng = np.random.default_rng([seed, RL_SEED, step])
    return [generate(rng) for _ in range(n)]


def rollout_generator(seed: int, step: int) -> torch.Generator:
    """The sampling generator of step `step`: the same on every attempt."""
    g = torch.Generator()
    g.manual_seed(int(np.random.default_rng([seed, RL_SEED, step, 1]).integers(2**62)))
    return g


def stop_ids(tok: ChatTokenizer) -> tuple[int, ...]:
    """Tokens that end a response: `<|end|>` (the chat template's) and `<|doc|>` if the tokenizer has it."""
    ids = [role_id(tok, "end")]
    if "<|doc|>" in tok.special_ids:
        ids.append(tok.special_ids["<|doc|>"])
    return tuple(ids)


def is_well_formed(text: str, stopped: bool) -> bool:
    return stopped and FORMAT_RE.search(text) is not None


def score(problem: Problem, text: str, stopped: bool, format_reward: float) -> tuple[float, bool, bool]:
    """(reward, exact answer, well formed) of one response."""
    correct = check(problem.answer, text)
    formatted = is_well_formed(text, stopped)
    return float(correct) + format_reward * float(formatted), correct, formatted


@dataclass
class Rollout:
    """P prompts x G samples, row p * G + g = sample g of prompt p."""

    problems: list[Problem]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    """Log-probability of each response token under the sampling policy (untempered)."""
    texts: list[str]
    rewards_PG: torch.Tensor
    correct_PG: torch.Tensor
    formatted_PG: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.rewards_PG.shape[1]


def rollout(
    policy: TrinityModel,
    tok: ChatTokenizer,
    problems: list[Problem],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    format_reward: float,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample `group_size` responses to each problem and grade them (text without the closing stop token)."""
    prompts = [user_prompt(tok, p.prompt) for p in problems for _ in range(group_size)]
    gen = generate_with_logprobs(
        policy, prompts, max_new_tokens, temperature, top_p, generator, stop_ids=stop_ids(tok), pad_id=tok.pad_id
    )
    texts, rewards, correct, formatted = [], [], [], []
    for i, (ids, stopped) in enumerate(zip(gen.tokens, gen.stopped, strict=True)):
        text = tok.decode(ids[:-1] if stopped else ids)
        r, c, f = score(problems[i // group_size], text, stopped, format_reward)
        texts.append(text)
        rewards.append(r)
        correct.append(c)
        formatted.append(f)
    shape = (len(problems), group_size)
    return Rollout(
        problems,
        prompts,
        gen.tokens,
        gen.logprobs,
        texts,
        torch.tensor(rewards, dtype=torch.float64).view(shape),
        torch.tensor(correct).view(shape),
        torch.tensor(formatted).view(shape),
    )
