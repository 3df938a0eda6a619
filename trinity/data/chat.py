"""Chat data for SFT (PAPER.md 7): the template, the loss mask, the built-in math set, greedy packing.

Template (token ids, no text markers): every message is

    <|ROLE|> content tokens <|end|>

with ROLE one of system, user, assistant, in order. The loss is on assistant tokens only: an
assistant message's content tokens and its `<|end|>` are targets; its `<|assistant|>` role token
is not (it is given to the model at inference, see `prompt_ids`). A generation prompt is the
conversation so far followed by `<|assistant|>`; the model answers and closes with `<|end|>`.

Targets: `targets[t] = ids[t + 1]` if token t + 1 is trained, else -100 (so position t predicts the
next assistant token); the last token has no target.

Packing (`SftBatches`): conversations in a seeded per-epoch order are packed greedily into
`seq_len` sequences: a conversation that does not fit in what is left of the sequence starts the
next one, and the rest is padding (`<|pad|>`, target -100). A conversation longer than `seq_len`
is cut to `seq_len`. Each conversation of a sequence gets its own document id (0, 1, ...) and the
padding the next one, so intra-document masking keeps conversations apart. The state is
(epoch, position in the epoch order): exact on resume.

Data streams (`data.streams`, trinity.distributed.data): stream s of S packs only the
conversations at positions s, s + S, s + 2S, ... of each epoch's order, so within an epoch the
streams share the conversations out, nothing lost, nothing read twice (S = 1: all of them).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from trinity.data.mathgen import Problem, generate
from trinity.data.packing import IGNORE, Batch

ROLES = ("system", "user", "assistant")
MATH_SFT_SEED = 0x5F7
"""Seed offset of the built-in SFT math conversations (RL and evals use other offsets)."""


class ChatTokenizer(Protocol):
    special_ids: dict[str, int]
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def role_id(tok: ChatTokenizer, role: str) -> int:
    name = f"<|{role}|>"
    if name not in tok.special_ids:
        raise ValueError(f"the tokenizer has no {name} token (special tokens: {', '.join(tok.special_ids)})")
    return tok.special_ids[name]


def render(tok: ChatTokenizer, messages: Iterable[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it is trained (assistant content and its end)."""
    end = role_id(tok, "end")
    ids: list[int] = []
    trained: list[bool] = []
    for m in messages:
        if m.role not in ROLES:
            raise ValueError(f"unknown chat role {m.role!r} (allowed: {', '.join(ROLES)})")
        body = [*tok.encode(m.content), end]
        ids += [role_id(tok, m.role), *body]
        trained += [False] + [m.role == "assistant"] * len(body)
    return ids, trained


def targets_of(ids: list[int], trained: list[bool]) -> list[int]:
    """Next-token targets, -100 where the next token is not trained (and at the last token)."""
    return [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def prompt_ids(tok: ChatTokenizer, messages: Iterable[Message]) -> list[int]:
    """The tokens that ask the model for the next assistant message."""
    ids, _ = render(tok, messages)
    return [*ids, role_id(tok, "assistant")]


def user_prompt(tok: ChatTokenizer, text: str) -> list[int]:
    return prompt_ids(tok, [Message("user", text)])


def math_conversation(p: Problem) -> list[Message]:
    return [Message("user", p.prompt), Message("assistant", p.solution)]


def math_sft_problems(seed: int, n: int) -> list[Problem]:
    """The built-in SFT problems of an experiment seed (evals exclude them from held-out sets)."""
    rng = np.random.default_rng([seed, MATH_SFT_SEED])
    return [generate(rng) for _ in range(n)]


def read_chat_jsonl(patterns: Iterable[str], base_dir: Path) -> list[list[Message]]:
    """Conversations from JSON Lines files: one {"messages": [{"role", "content"}, ...]} per line."""
    out: list[list[Message]] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
        paths = sorted(glob.glob(full, recursive=True))
        if not paths:
            raise FileNotFoundError(f"no chat files match {pattern!r} (relative to {base_dir})")
        for path in paths:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        out.append([Message(str(m["role"]), str(m["content"])) for m in row["messages"]])
                    except (KeyError, TypeError, json.JSONDecodeError) as exc:
                        raise ValueError(f"{path}:{n}: not a chat record ({exc})") from None
    return out


class SftBatches:
    """Greedily packed chat micro-batches with the loader interface (`next_batch`, `state_dict`)."""

    kind = "sft"

    def __init__(
        self,
        conversations: list[tuple[list[int], list[int]]],
        seq_len: int,
        micro_batch: int,
        pad_id: int,
        seed: int = 0,
        stream: int = 0,
        n_streams: int = 1,
    ) -> None:
        if not conversations:
            raise ValueError("no SFT conversations: add stages.sft.chat_sources or math_conversations")
        if not 0 <= stream < n_streams:
            raise ValueError(f"stream {stream} is outside 0..{n_streams - 1}")
        if len(conversations) < n_streams:
            raise ValueError(
                f"{len(conversations)} SFT conversations cannot feed data.streams = {n_streams} streams: "
                "add conversations or use fewer streams"
            )
        self.stream, self.n_streams = stream, n_streams
        self.convs = [(np.asarray(i[:seq_len], np.int64), np.asarray(t[:seq_len], np.int64)) for i, t in conversations]
        self.seq_len, self.micro_batch, self.pad_id, self.seed = seq_len, micro_batch, pad_id, seed
        self.epoch, self.pos = 0, 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            perm = np.random.default_rng([self.seed, epoch, 0x5F7]).permutation(len(self.convs))
            self._order = perm[self.stream :: self.n_streams]
            self._order_epoch = epoch
        return self._order

    def _peek(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pos == len(self._order_of(self.epoch)):
            self.epoch, self.pos = self.epoch + 1, 0
        return self.convs[int(self._order_of(self.epoch)[self.pos])]

    def next_sequence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tok = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        tgt = np.full(self.seq_len, IGNORE, dtype=np.int64)
        doc = np.zeros(self.seq_len, dtype=np.int64)
        t, k = 0, 0
        while True:
            ids, targets = self._peek()
            if t > 0 and t + len(ids) > self.seq_len:
                break
            tok[t : t + len(ids)], tgt[t : t + len(ids)], doc[t : t + len(ids)] = ids, targets, k
            t, k = t + len(ids), k + 1
            self.pos += 1
            if t == self.seq_len:
                break
        doc[t:] = k
        return tok, tgt, doc

    def next_batch(self) -> Batch:
        rows = [self.next_sequence() for _ in range(self.micro_batch)]
        return Batch(*(torch.from_numpy(np.stack([r[i] for r in rows])) for i in range(3)))

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "conversations": len(self.convs),
            "stream": self.stream,
            "n_streams": self.n_streams,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.config(), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.config()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"SFT data state does not match ({diff})")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
