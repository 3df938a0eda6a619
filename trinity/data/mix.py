"""How a phase's token budget and mix weights become each source's quota of tokens.

- Quotas: source s gets `round(tokens * w_s / sum(w))` tokens (`quotas`). Tokens count the boundary
  token each document ends with.
- Which documents fill a quota is the prepare's rule (`trinity.nodes.prepare`): after the held-out
  documents (the first `holdout_documents` of every source, the same in every phase, never trained
  on), documents are taken whole, in stream order, from where the previous phases stopped, until the
  quota is met (the last one may overshoot by less than one document); a finite source that runs out
  goes on with its next pass (`trinity.data.positions`).
"""

from __future__ import annotations


def quotas(tokens: int, mix: dict[str, float]) -> dict[str, int]:
    """Token quota of each source: tokens x weight / sum(weights), rounded."""
    total = sum(mix.values())
    return {name: round(tokens * w / total) for name, w in mix.items()}
