"""Held-out loss per source: mean next-token cross-entropy on documents no phase trained on.

Each held-out document (its tokens, `<|doc|>` last) is scored as one sequence cut into windows of
`seq_len` inputs: window k predicts tokens k*seq_len + 1 .. (k+1)*seq_len from the inputs of that
window only (no context carried over a window boundary, as in training at that length). The loss of
a source is the token-weighted mean over all its documents' predicted tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trinity.data.packing import IGNORE
from trinity.distributed.device import module_device, to_device
from trinity.model import TrinityModel


def windows(doc: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) windows of one document."""
    doc = np.asarray(doc, dtype=np.int64)
    out = []
    for a in range(0, len(doc) - 1, seq_len):
        inputs = doc[a : a + seq_len]
        targets = doc[a + 1 : a + seq_len + 1]
        out.append((inputs[: len(targets)], targets))
    return out


@torch.no_grad()
def heldout_loss(
    model: TrinityModel, docs_by_source: dict[str, list[np.ndarray]], seq_len: int, batch: int = 8
) -> dict[str, dict[str, Any]]:
    """Per source: {"loss": mean CE (nats/token), "tokens": predicted tokens, "documents": n}."""
    out: dict[str, dict[str, Any]] = {}
    for source, docs in docs_by_source.items():
        rows = [w for d in docs for w in windows(d, seq_len)]
        total, count = 0.0, 0
        for a in range(0, len(rows), batch):
            chunk = rows[a : a + batch]
            T = max(len(x) for x, _ in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            tgt = torch.full((len(chunk), T), IGNORE, dtype=torch.long)
            for b, (x, y) in enumerate(chunk):
                ids[b, : len(x)] = torch.from_numpy(x)
                tgt[b, : len(y)] = torch.from_numpy(y)
            ids, tgt = to_device((ids, tgt), module_device(model))
            logits = model(ids).logits.float()
            ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE, reduction="sum")
            total += float(ce)
            count += int((tgt != IGNORE).sum())
        out[source] = {"loss": total / max(count, 1), "tokens": count, "documents": len(docs)}
    return out
