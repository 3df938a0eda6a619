"""Group-relative policy optimisation (GRPO): the trainer side of RL with verifiable rewards.

Given a rollout (P prompts x G sampled responses, their rewards and the sampling policy's
log-probabilities), one update is:

- advantages, per group: A = (r - mean_group(r)) / (std_group(r) + eps), std the population
  standard deviation (divide by G). A group whose rewards are all equal has A = 0 everywhere: it
  carries no signal. Every token of a response gets its response's advantage.
- ratio per response token: rho = exp(logp_new - logp_old), logp_old from the rollout.
- clipped surrogate per token: min(rho A, clip(rho, 1 - eps_c, 1 + eps_c) A)  (PPO).
- KL to the reference (SFT) policy per token, the k3 estimator (Schulman): with
  d = logp_ref - logp_new, k3 = exp(d) - d - 1 (>= 0, unbiased for KL(new || ref) under samples
  of the new policy).
- loss = - mean_tokens(surrogate) + kl_weight x mean_tokens(k3), the means over every response
  token of the batch (token-level aggregation: long and short responses weigh per token, as in
  DAPO / Dr. GRPO, rather than per response).
With one update per rollout, rho = 1 up to the numerical difference between cached decoding and
the full forward; the clip still bounds what a stale rollout could do.

Legend: P prompts, G samples per prompt, B = P x G sequences, T sequence length, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trinity.data.packing import IGNORE
from trinity.distributed.device import module_device, to_device
from trinity.model import TrinityModel


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group population std + eps), float64."""
    r = rewards_PG.to(torch.float64)
    mean_P1 = r.mean(dim=1, keepdim=True)
    std_P1 = r.std(dim=1, unbiased=False, keepdim=True)
    return (r - mean_P1) / (std_P1 + eps)


@dataclass
class PolicyBatch:
    """Prompt + response sequences, right-padded: position t predicts targets_BT[t] = token t + 1."""

    ids_BT: torch.Tensor
    targets_BT: torch.Tensor
    """Response tokens at the positions that predict them, -100 elsewhere (prompt, padding)."""
    mask_BT: torch.Tensor
    """targets_BT != -100: the tokens the loss is over."""
    old_logprobs_BT: torch.Tensor
    """Sampling policy's log-probability of each target (0 where masked)."""


def policy_batch(
    prompts: list[list[int]], responses: list[list[int]], old_logprobs: list[list[float]], pad_id: int
) -> PolicyBatch:
    """Pack each prompt + response into one right-padded row with its response-only targets."""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    B = len(prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    old = torch.zeros(B, T, dtype=torch.float32)
    for b, (p, r, lp) in enumerate(zip(prompts, responses, old_logprobs, strict=True)):
        seq = p + r
        ids[b, : len(seq)] = torch.tensor(seq)
        if r:
            targets[b, len(p) - 1 : len(seq) - 1] = torch.tensor(r)
            old[b, len(p) - 1 : len(seq) - 1] = torch.tensor(lp, dtype=torch.float32)
    return PolicyBatch(ids, targets, targets != IGNORE, old)


def token_logprobs(model: TrinityModel, ids_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(target | prefix) at every position (0 where the target is -100), with gradients, on the
    model's device."""
    ids_BT, targets_BT = to_device((ids_BT, targets_BT), module_device(model))
    logits_BTV = model(ids_BT).logits.float()
    safe_BT = targets_BT.clamp(min=0)
    logp_BT = -F.cross_entropy(logits_BTV.transpose(1, 2), safe_BT, reduction="none")
    return torch.where(targets_BT != IGNORE, logp_BT, torch.zeros_like(logp_BT))


@dataclass
class GrpoStats:
    loss: float
    surrogate: float
    kl: float
    clip_fraction: float
    ratio_mean: float
    tokens: int


def grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float,
    kl_weight: float = 0.0,
    ref_logp_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GrpoStats]:
    """The clipped, KL-penalised GRPO loss (a scalar to minimise) and its statistics, on logp_BT's device."""
    old_logp_BT, advantages_B, mask_BT = to_device((old_logp_BT, advantages_B, mask_BT), logp_BT.device)
    m = mask_BT.to(logp_BT.dtype)
    n = m.sum().clamp(min=1.0)
    adv_B1 = advantages_B.to(logp_BT.dtype)[:, None]
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    clipped_BT = ratio_BT.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    surrogate_BT = torch.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
    surrogate = (surrogate_BT * m).sum() / n
    kl = torch.zeros((), dtype=logp_BT.dtype, device=logp_BT.device)
    if ref_logp_BT is not None:
        d_BT = ref_logp_BT - logp_BT
        kl = ((torch.exp(d_BT) - d_BT - 1.0) * m).sum() / n
    loss = -surrogate + (kl_weight * kl if kl_weight > 0 else 0.0)
    with torch.no_grad():
        # Clipped = the clipped term is the smaller one, so the token passes no policy gradient.
        was_clipped = (clipped_BT * adv_B1 < ratio_BT * adv_B1) & mask_BT
        stats = GrpoStats(
            loss=float(loss),
            surrogate=float(surrogate),
            kl=float(kl),
            clip_fraction=float(was_clipped.sum() / n),
            ratio_mean=float((ratio_BT * m).sum() / n),
            tokens=int(mask_BT.sum()),
        )
    return loss, stats
