"""MK-NIAH (multi-key needle in a haystack, after RULER): several key-value needles in filler; recall one.

A haystack of exactly `length` tokens (PAPER.md 6 measures extension by it):

    <filler sentences ...> The value of key amber-river is 482913. <filler ...> The value of key
    cold-stone is 190377. <filler ...> What is the value of key amber-river? The value of key amber-river is

- filler: RULER's noise sentences ("The grass is green. The sky is blue. ..."), repeated, cut to fit;
- `n_keys` needles "The value of key K is V." at random sentence boundaries (K: two random words,
  distinct; V: a random 6-digit number), in random order; one of them is asked for at the end;
- the model continues greedily; it is right when the first number it writes is exactly V
  (`accuracy`, the RULER metric);
- a softer score for small models (`choice_accuracy`): the asked value is more likely than every
  other needle's value as the continuation (teacher-forced log-likelihood of " V"); chance is
  1 / n_keys. It shows whether the model uses the needles at all when it cannot yet copy them.
Plain text, no chat template: it measures the context, and is the same before and after SFT.
Haystacks are deterministic in (seed, length, index).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from trinity.distributed.device import module_device, to_device
from trinity.model import TrinityModel
from trinity.model.generate import generate

FILLER = (
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)
WORDS = (
    "amber",
    "apple",
    "birch",
    "cloud",
    "cold",
    "copper",
    "crane",
    "delta",
    "ember",
    "fern",
    "frost",
    "glass",
    "harbor",
    "iron",
    "jade",
    "lake",
    "lantern",
    "maple",
    "marble",
    "meadow",
    "north",
    "oak",
    "orbit",
    "pepper",
    "pine",
    "quartz",
    "raven",
    "river",
    "salt",
    "silver",
    "stone",
    "storm",
    "thunder",
    "tulip",
    "velvet",
    "willow",
    "winter",
    "yellow",
    "zephyr",
)
_FIRST_NUMBER = re.compile(r"\d+")


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Haystack:
    ids: list[int]
    needles: tuple[tuple[str, str], ...]
    """(key, value) of every needle, in the order they appear."""
    key: str
    value: str
    """The asked key and its value."""


def needle_text(key: str, value: str) -> str:
    return f" The value of key {key} is {value}."


def question_text(key: str) -> str:
    return f" What is the value of key {key}? The value of key {key} is"


def make_haystack(tok: TextTokenizer, length: int, n_keys: int, seed: int, index: int) -> Haystack:
    """Haystack `index` of the given length (exactly `length` tokens; raises if the needles don't fit)."""
    rng = np.random.default_rng([seed, 0x41A5, length, index])
    keys: list[str] = []
    while len(keys) < n_keys:
        k = "-".join(rng.choice(WORDS, size=2, replace=False))
        if k not in keys:
            keys.append(k)
    values = [str(int(rng.integers(100_000, 1_000_000))) for _ in keys]
    asked = int(rng.integers(n_keys))
    needles = [tok.encode(needle_text(k, v)) for k, v in zip(keys, values, strict=True)]
    question = tok.encode(question_text(keys[asked]))
    budget = length - len(question) - sum(len(n) for n in needles)
    sentences = [tok.encode(s) for s in FILLER]
    filler: list[list[int]] = []
    used = 0
    while used < budget:
        s = sentences[len(filler) % len(sentences)]
        filler.append(s[: budget - used])
        used += len(filler[-1])
    if budget < 0:
        raise ValueError(f"{n_keys} needles and the question need more than {length} tokens")
    # Needle j goes before filler sentence slots[j] (sorted, so needles keep their order).
    slots = sorted(int(x) for x in rng.integers(0, len(filler) + 1, size=n_keys))
    ids: list[int] = []
    j = 0
    for i in range(len(filler) + 1):
        while j < n_keys and slots[j] == i:
            ids += needles[j]
            j += 1
        if i < len(filler):
            ids += filler[i]
    ids += question
    assert len(ids) == length, (len(ids), length)
    return Haystack(ids, tuple(zip(keys, values, strict=True)), keys[asked], values[asked])


def is_correct(generated: str, value: str) -> bool:
    """Exact match: the first number of the continuation is the needle's value."""
    found = _FIRST_NUMBER.search(generated)
    return found is not None and found.group(0) == value


@torch.no_grad()
def value_choice(model: TrinityModel, tok: TextTokenizer, stack: Haystack) -> bool:
    """Whether " V" of the asked key is the needle value the model finds most likely after the question."""
    conts = [tok.encode(" " + v) for _, v in stack.needles]
    T = len(stack.ids) + max(len(c) for c in conts)
    ids = torch.zeros(len(conts), T, dtype=torch.long)
    for b, c in enumerate(conts):
        ids[b, : len(stack.ids) + len(c)] = torch.tensor(stack.ids + c)
    P = len(stack.ids)
    logits_BCV = model(to_device(ids, module_device(model))).logits[:, P - 1 :]  # positions predicting the values
    logp_BCV = torch.log_softmax(logits_BCV.float(), dim=-1).cpu()  # one copy to the host, then many lookups
    scores = [float(sum(logp_BCV[b, i, t] for i, t in enumerate(c))) for b, c in enumerate(conts)]
    asked = [v for _, v in stack.needles].index(stack.value)
    return all(scores[asked] > x for i, x in enumerate(scores) if i != asked)


@torch.no_grad()
def evaluate_niah(
    model: TrinityModel,
    tok: TextTokenizer,
    length: int,
    n_keys: int,
    samples: int,
    seed: int = 0,
    batch: int = 4,
    pad_id: int = 0,
) -> dict[str, Any]:
    """Accuracy (greedy exact match) and choice accuracy over `samples` haystacks of `length` tokens."""
    stacks = [make_haystack(tok, length, n_keys, seed, i) for i in range(samples)]
    new = max(len(tok.encode(" " + s.value)) for s in stacks) + 2
    hits: list[bool] = []
    examples: list[dict[str, str]] = []
    choices = [value_choice(model, tok, s) for s in stacks]
    for a in range(0, samples, batch):
        chunk = stacks[a : a + batch]
        outs = generate(model, [s.ids for s in chunk], new, pad_id=pad_id)
        for s, out in zip(chunk, outs, strict=True):
            text = tok.decode(out)
            hits.append(is_correct(text, s.value))
            if len(examples) < 3:
                examples.append({"key": s.key, "value": s.value, "output": text})
    n = max(len(hits), 1)
    return {"accuracy": sum(hits) / n, "choice_accuracy": sum(choices) / n, "n": len(hits), "examples": examples}
