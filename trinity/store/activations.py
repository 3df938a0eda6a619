"""Activation capture: chosen modules' outputs (and MoE router scores) at chosen steps, into Zarr.

    out_root/step-00000010/          committed like a checkpoint (tmp folder, rename, COMMITTED)
      layers.3/hidden                [B, T, D] the module's output (a block's residual stream)
      layers.3/router_scores         [B, T, E] fp32 router scores, for a block whose mlp is MoE
                                     (or a name that is the MoE module itself)

Forward hooks do the work. Outside a chosen step each hook is one attribute test and returns,
so capture costs nothing on the hot path. Router scores are recomputed from the MoE's input by
its own `route` (the same function on the same input, so the same values): the router weight is
read inside `route`, not called as a module, so there is no submodule output to hook.
Several forwards within one step (gradient accumulation) are concatenated along the batch.
A module recomputed in backward (activation checkpointing) runs its hooks again; they skip that
replay (trinity.model.checkpointing.recomputing), so each forward is recorded once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trinity.model.checkpointing import recomputing
from trinity.model.moe import MoE
from trinity.store.checkpoint import save_checkpoint


class ActivationCapture:
    """Record `layer_names`' outputs at `steps`; call begin_step/end_step (or `at_step`) around each step."""

    def __init__(self, model: nn.Module, layer_names: list[str], steps: Iterable[int], out_root: Path) -> None:
        self.out_root = Path(out_root)
        self.steps = frozenset(steps)
        self.layer_names = list(layer_names)
        self._step: int | None = None  # set only while a chosen step runs: the hooks' on/off switch
        self._buffers: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name in self.layer_names:
            module = model.get_submodule(name)  # raises AttributeError naming the missing part
            self._handles.append(module.register_forward_hook(self._hidden_hook(name)))
            moe = module if isinstance(module, MoE) else getattr(module, "mlp", None)
            if isinstance(moe, MoE):
                self._handles.append(moe.register_forward_hook(self._router_hook(name)))

    def _keep(self, name: str, kind: str, value: torch.Tensor) -> None:
        self._buffers.setdefault(name, {}).setdefault(kind, []).append(value.detach().to("cpu", copy=True))

    def _hidden_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._step is None or recomputing():  # off, or a checkpointed region's replay
                return
            self._keep(name, "hidden", output[0] if isinstance(output, tuple) else output)

        return hook

    def _router_hook(self, name: str) -> Any:
        def hook(moe: MoE, args: Any, output: Any) -> None:
            if self._step is None or recomputing():  # off, or a checkpointed region's replay
                return
            x_BTD = args[0]
            B, T, D = x_BTD.shape
            with torch.no_grad():
                scores_TE, _, _ = moe.route(x_BTD.reshape(B * T, D))
            self._keep(name, "router_scores", scores_TE.view(B, T, -1))

        return hook

    def begin_step(self, step: int) -> None:
        """Arm the hooks if `step` is a chosen one."""
        self._buffers = {}
        self._step = step if step in self.steps else None

    def end_step(self) -> Path | None:
        """Disarm; write what was captured (committed atomically) and return its folder, or None."""
        step, self._step = self._step, None
        buffers, self._buffers = self._buffers, {}
        if step is None or not buffers:
            return None
        state = {
            name: {kind: torch.cat(parts) if len(parts) > 1 else parts[0] for kind, parts in kinds.items()}
            for name, kinds in buffers.items()
        }
        # Only rank 0 captures in a multi-rank job (its own micro-batches): a local write, not a collective one.
        return save_checkpoint(
            self.out_root, step, state, keep_last=0, meta={"layers": list(state)}, pack_below_bytes=0, distributed=False
        )

    @contextlib.contextmanager
    def at_step(self, step: int) -> Iterator[None]:
        """`with capture.at_step(step): loss = model(...)` — writes on a clean exit only."""
        self.begin_step(step)
        try:
            yield
        except BaseException:
            self._step, self._buffers = None, {}
            raise
        self.end_step()

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._step, self._buffers = None, {}

    def __enter__(self) -> ActivationCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
