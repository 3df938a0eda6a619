"""Activation checkpointing of the transformer blocks (parallel.activation_checkpointing).

Backward needs what the forward computed; checkpointing keeps only a region's inputs and recomputes
its insides when the backward reaches them (torch.utils.checkpoint, non-reentrant), trading one
more forward of the region for its activation memory. The region per block:

    none                                 nothing recomputed
    full                                 the whole TransformerBlock (its inputs are all it keeps)
    selective, selective_save=moe        block.attn recomputed; the MoE / dense FFN keeps its own
    selective, selective_save=attention  block.mlp (MoE or dense FFN) recomputed; attention keeps its own

Under `selective` the region is the sublayer's module itself: the RMSNorms around it stay outside
and keep their inputs (two [B, T, D] tensors per block more than a region spanning the norms would
keep; the attention or expert internals it frees are several times that).

The regions are marked with torch's composable `checkpoint(module)`
(torch.distributed._composable), which works by forward hooks: module names, parameters and
state-dict keys stay exactly as they are (a wrapper module, as in torchtitan's
checkpoint_wrapper, would add `_checkpoint_wrapped_module.` to every name), and it composes with
FSDP2's `fully_shard` applied after it (FSDP's unshard and reshard hooks run outside the region;
in a recompute, which runs in backward, FSDP's hooks only make sure the parameters are unsharded).

What a recompute replays, and why it is harmless:
- the MoE's returned expert counts and aux loss: torch keeps the first forward's outputs and uses
  the recompute only for the tensors saved for backward, so each is counted once;
- routing: the same input and expert bias (the bias moves only at the optimizer step) give the
  same top-k, so the recompute has the same shapes (torch checks their metadata);
- under expert parallelism the recomputed MoE repeats its all-to-all exchanges; every rank
  recomputes the same layers in the same order in its backward, so the collectives match (this
  is why `selective_save: moe` is the default policy);
- forward hooks of modules inside the region run again. `recomputing()` is true meanwhile, so a
  hook that must see each forward once (activation capture, trinity.store.activations) skips it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.distributed._composable.checkpoint_activation import checkpoint

from trinity.model.transformer import TrinityModel
from trinity.spec.parallel import ParallelSpec

_recomputing = 0  # depth of recomputes running now (a recompute can contain a nested region's)
_APPLIED = "_activation_checkpointing"  # the policy applied to a model, kept on the model


def recomputing() -> bool:
    """True while a checkpointed region is being recomputed in backward (not in the forward)."""
    return _recomputing > 0


@contextlib.contextmanager
def _recompute_context() -> Iterator[None]:
    global _recomputing
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1


def _contexts() -> tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]:
    """(forward context, recompute context) of every region: only the recompute is flagged."""
    return contextlib.nullcontext(), _recompute_context()


def checkpointed_modules(model: TrinityModel, parallel: ParallelSpec) -> list[nn.Module]:
    """The modules `parallel` asks to recompute, one per block (none for `none`)."""
    policy = parallel.activation_checkpointing
    if policy == "none":
        return []
    if policy == "full":
        return list(model.layers)
    sublayer = "attn" if parallel.selective_save == "moe" else "mlp"
    return [getattr(block, sublayer) for block in model.layers]


def apply_activation_checkpointing(model: TrinityModel, parallel: ParallelSpec) -> None:
    """Mark `model`'s blocks (or sublayers) for recompute in place as `parallel.activation_checkpointing`
    asks; call it before any sharding (fully_shard), after expert parallelism.

    Applying the same policy again does nothing (the single-process and the distributed set-up
    may both call this); a different policy on an already checkpointed model is an error.
    """
    policy = (parallel.activation_checkpointing, parallel.selective_save)
    applied: tuple[str, str] | None = getattr(model, _APPLIED, None)
    if applied is not None:
        if applied[0] == policy[0] and (policy[0] != "selective" or applied == policy):
            return
        raise ValueError(f"activation checkpointing {applied} is already applied; cannot apply {policy}")
    for module in checkpointed_modules(model, parallel):
        checkpoint(module, context_fn=_contexts)
    setattr(model, _APPLIED, policy)
