"""Feed-forward layers: dense SwiGLU, and the sigmoid-routed MoE with one shared expert (PAPER.md 2).

Routing: s = sigmoid(x W_r^T) in fp32; top-k SELECTION on s + b (b: per-layer expert bias, a
no-grad fp32 buffer moved by SMEBU / the sign update); GATES from the unbiased s of the chosen
experts, normalised over the k, times route_scale. No capacity limit, no token dropping.

Fast path (`MoE`): the T*K (token, expert) pairs are sorted by expert, gathered into one
[T*K, D] matrix and handed with the per-expert row counts to `GroupedExperts` (at `mlp.experts`,
holding the stacked w1_EFD, w3_EFD, w2_EDF), which runs them through grouped matmuls
(torch._grouped_mm; one kernel per projection, however many experts); the MoE then un-sorts the
rows and sums them over the k with the gates. Expert parallelism (trinity/distributed/
expert_parallel.py) swaps `mlp.experts` for a subclass that ships the sorted rows to the ranks
owning their experts and back; routing, sorting and combining stay here, unchanged.
`MoEReference` computes every expert on every token with a dense gate matrix: slow, obvious,
used by tests.

Balanced routing (`balanced_routing()`): the per-expert row counts are data-dependent (a bincount of
the top-k choices) and so are the splits of the expert-parallel all-to-all that follow from them.
A trace under FakeTensorMode (trinity.distributed.trace) has no data, so inside this context every
expert receives T*K / E rows (the remainder spread over the first experts), known on the host; the
selection itself still runs. Outside it nothing changes.

Legend: B batch, T tokens (flattened B*T where noted), D d_model, E routed experts, K top-k,
F expert hidden, M = T*K routed rows, S shared hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trinity.model.losses import sequence_aux_loss

_BALANCED = False


@contextmanager
def balanced_routing() -> Iterator[None]:
    """Route as if every expert received the same number of rows (for traces; see the module docstring)."""
    global _BALANCED
    before, _BALANCED = _BALANCED, True
    try:
        yield
    finally:
        _BALANCED = before


def routing_is_balanced() -> bool:
    """Whether `balanced_routing()` is on."""
    return _BALANCED


def balanced_counts(rows: int, n: int) -> list[int]:
    """`rows` split over `n` groups as evenly as possible, the first ones taking the remainder."""
    return [rows // n + (1 if i < rows % n else 0) for i in range(n)]


def to_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype when autocast is on for its device (else x): cast once for several
    matmuls that read it, where autocast would cast it (and add its gradient back) per matmul."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense FFN and the shared expert."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_compute_dtype(x)
        out: torch.Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out


def grouped_linear(x_MD: torch.Tensor, w_EFD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows offsets[e-1]:offsets[e] of x times w[e]^T, for every expert e, in one grouped kernel."""
    size = x_MD.element_size()
    aligned = all(n * size % 16 == 0 for n in (x_MD.shape[-1], *w_EFD.shape[-2:]))  # the kernel's rule
    # A trace (balanced routing, fake tensors) loops in fp32: _grouped_mm's shape function accepts only bf16.
    traced_fp32 = _BALANCED and x_MD.dtype != torch.bfloat16
    if hasattr(torch, "_grouped_mm") and aligned and not traced_fp32:
        return torch._grouped_mm(x_MD, w_EFD.transpose(-2, -1), offs=offsets_E)
    # Fallback (no grouped mm, or rows not 16-byte aligned): a loop over experts, never over tokens.
    if _BALANCED:
        sizes = balanced_counts(x_MD.shape[0], w_EFD.shape[0])
    else:
        sizes = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    chunks = x_MD.split(sizes)  # type: ignore[no-untyped-call]
    return torch.cat([x @ w.T for x, w in zip(chunks, w_EFD, strict=True)])


class _PermuteRows(torch.autograd.Function):
    """y = x[perm] for a permutation; the backward is the inverse gather (no scatter-add needed)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm], with `inverse` = argsort(perm) used by the backward."""
    out: torch.Tensor = _PermuteRows.apply(x, perm, inverse)  # type: ignore[no-untyped-call]
    return out


def swiglu_grouped(
    x_MD: torch.Tensor, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """w2_e(silu(w1_e x) * w3_e x) for the counts_E[e] consecutive rows of each expert e (plain tensors).

    Under autocast the experts run in the autocast dtype, as an autocast nn.Linear would (the
    grouped matmul is not on autocast's list, so without this it would stay fp32: on a bf16 CPU
    with AMX that is 2-3x slower).
    """
    x_MD, w1_EFD, w3_EFD, w2_EDF = (to_compute_dtype(t) for t in (x_MD, w1_EFD, w3_EFD, w2_EDF))
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    h_MF = F.silu(grouped_linear(x_MD, w1_EFD, offsets_E)) * grouped_linear(x_MD, w3_EFD, offsets_E)
    return grouped_linear(h_MF, w2_EDF, offsets_E)


# How rows reach experts held elsewhere: (x_MD, counts_E, experts) -> y_MD, set by expert parallelism.
ExpertDispatch = Callable[[torch.Tensor, torch.Tensor, "GroupedExperts"], torch.Tensor]


class GroupedExperts(nn.Module):
    """E routed SwiGLU experts stacked as 3-D weights, applied to rows already sorted by expert.

    Per-expert [out, in] matrices are stacked along E: expert parallelism shards them along E, and
    Muon orthogonalises each expert's matrix separately. `dispatch` is None on one device; under
    expert parallelism (trinity.distributed.expert_parallel) it holds this rank's E / ep experts'
    shard of the weights and an all-to-all that brings every rank's rows to their expert and back.
    """

    def __init__(self, n_experts: int, d_model: int, expert_hidden: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.w1_EFD = nn.Parameter(torch.empty(n_experts, expert_hidden, d_model))
        self.w3_EFD = nn.Parameter(torch.empty(n_experts, expert_hidden, d_model))
        self.w2_EDF = nn.Parameter(torch.empty(n_experts, d_model, expert_hidden))
        self.dispatch: ExpertDispatch | None = None

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """expert_e(rows) for each block of counts_E[e] consecutive rows of x_MD (sorted by expert, all E)."""
        if self.dispatch is not None:
            return self.dispatch(x_MD, counts_E, self)
        return swiglu_grouped(x_MD, self.w1_EFD, self.w3_EFD, self.w2_EDF, counts_E)


def _rename_flat_expert_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints from before `mlp.experts` existed keep loading: `mlp.w1_EFD` -> `mlp.experts.w1_EFD`."""
    for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
        if prefix + name in state_dict and prefix + "experts." + name not in state_dict:
            state_dict[prefix + "experts." + name] = state_dict.pop(prefix + name)


class MoE(nn.Module):
    """A sigmoid router, expert bias, the routed `GroupedExperts` and the shared expert."""

    expert_bias: torch.Tensor
    expert_bias_momentum: torch.Tensor

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        expert_hidden: int,
        n_shared_experts: int = 1,
        route_scale: float = 1.0,
        score_function: str = "sigmoid",
        normalize_gates: bool = True,
    ) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.route_scale = n_experts, top_k, route_scale
        self.score_function, self.normalize_gates = score_function, normalize_gates
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = GroupedExperts(n_experts, d_model, expert_hidden)
        # n shared experts of width F are one SwiGLU of width n*F (their outputs are summed).
        self.shared = SwiGLU(d_model, n_shared_experts * expert_hidden) if n_shared_experts > 0 else None
        # fp32 balancing state: no gradient, but saved and restored with the model.
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer("expert_bias_momentum", torch.zeros(n_experts, dtype=torch.float32))
        self.register_load_state_dict_pre_hook(_rename_flat_expert_keys)  # type: ignore[no-untyped-call]

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores_TE fp32, topk_ids_TK, gates_TK fp32)."""
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        use_sigmoid = self.score_function == "sigmoid"
        scores_TE = torch.sigmoid(logits_TE) if use_sigmoid else torch.softmax(logits_TE, dim=-1)
        _, topk_ids_TK = torch.topk(scores_TE.detach() + self.expert_bias, k=self.top_k, dim=-1)
        gates_TK = scores_TE.gather(1, topk_ids_TK)
        if self.normalize_gates:
            gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)  # 1e-20: as transformers
        return scores_TE, topk_ids_TK, gates_TK * self.route_scale

    def routed_experts(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, gates_TK: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """Sum over the k chosen experts of gate * expert(x) (in fp32, the gates' dtype): sort by expert,
        experts, un-sort."""
        T, D = x_TD.shape
        order_M = torch.argsort(topk_ids_TK.reshape(-1), stable=True)
        x_MD = x_TD.index_select(0, order_M // self.top_k)
        y_MD = self.experts(x_MD, counts_E)
        # Un-sort: row m of y_MD belongs to flat pair order_M[m].
        y_TKD = permute_rows(y_MD, torch.argsort(order_M), order_M).view(T, self.top_k, D)
        # Gates (fp32) times outputs, summed over the k, in fp32 (type promotion).
        return (y_TKD * gates_TK[:, :, None]).sum(dim=1)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output_BTD, counts_E int64 on biased top-k of these tokens, unweighted sequence aux loss)."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        scores_TE, topk_ids_TK, gates_TK = self.route(x_TD)
        if _BALANCED:  # a trace: no data to count (see the module docstring)
            counts = balanced_counts(topk_ids_TK.numel(), self.n_experts)
            counts_E = torch.tensor(counts, dtype=torch.int64, device=x_BTD.device)
        else:
            counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=self.n_experts)
        # Under autocast the experts compute in bf16: cast once for the routed experts (whose
        # gather, and all-to-all under expert parallelism, then moves half the bytes) and the shared one.
        x_cTD = to_compute_dtype(x_TD)
        out_TD = self.routed_experts(x_cTD, topk_ids_TK, gates_TK, counts_E)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_cTD)
        aux = sequence_aux_loss(scores_TE.view(B, T, -1), topk_ids_TK.view(B, T, -1))
        return out_TD.to(x_BTD.dtype).view(B, T, D), counts_E, aux


class MoEReference(MoE):
    """Same parameters and routing; experts computed densely on every token (tests only)."""

    def routed_experts(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, gates_TK: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        gates_TE = torch.zeros(x_TD.shape[0], self.n_experts, dtype=gates_TK.dtype, device=x_TD.device)
        gates_TE = gates_TE.scatter(1, topk_ids_TK, gates_TK)
        out_TD = torch.zeros_like(x_TD)
        w = self.experts
        for e in range(self.n_experts):
            h_TF = F.silu(x_TD @ w.w1_EFD[e].T) * (x_TD @ w.w3_EFD[e].T)
            out_TD = out_TD + gates_TE[:, e : e + 1].to(x_TD.dtype) * (h_TF @ w.w2_EDF[e].T)
        return out_TD
