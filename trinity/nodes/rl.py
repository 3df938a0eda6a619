"""The RL node: GRPO with verifiable rewards on generated math problems (PAPER.md 7).

Each step alternates, in one process, the two parts that could later run apart:
  rollout (trinity.rl.rollout): the step's `prompts_per_step` problems, `group_size` samples each
      from the current policy, graded (exact answer + format);
  update (trinity.rl.grpo): group-relative advantages, the clipped token-level surrogate against
      the rollout's log-probabilities, KL to the frozen SFT policy (k3; in the loss when
      `kl_weight` > 0, always logged), one optimizer step at the constant `stages.rl.lr`.
Optimizers are the recipe's (Muon for hidden matrices, AdamW for the rest) with every group's lr
set to `stages.rl.lr`; the expert biases stay as SFT left them (no balancing updates in RL).

Held-out check: before the first step and after the last, the policy answers `HELDOUT_PROBLEMS`
held-out problems greedily; their mean reward and accuracy are `evals` rows (task rl_heldout) at
steps 0 and `steps`, the SFT starting point and the result.

Telemetry per step: `steps` (loss, lr, grad norm, tokens = response tokens so far, step time) and
an `events` row of kind "rl" with reward, pass_rate (exact answers), format_rate,
response_length, kl, clip_fraction, ratio_mean, zero_advantage_groups, updated (0 when no group had
a reward spread: the step is skipped, see `grpo_update`) (query with
`(data->>'reward')::double`). Resume, checkpoints (model, optimizer, RNG, step) every
`execution.checkpoint.every` steps, at the end and on a stop request, and final.json are the
training skeleton's (trinity.nodes.loop), as for every training node; problems and the sampling
generator depend only on (seed, step), so a resumed run is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from trinity.data.tokenizer import Tokenizer
from trinity.distributed.device import module_device, to_device, training_device
from trinity.errors import NodeFailure
from trinity.evals.arithmetic import evaluate_arithmetic, heldout_problems, trained_prompts
from trinity.model import TrinityModel
from trinity.nodes.context import NodeContext, set_threads
from trinity.nodes.divergence import NonFiniteLoss, divergence_advice
from trinity.nodes.init_source import load_init
from trinity.nodes.loop import TrainingLoop, verify_training_node
from trinity.nodes.upstream import load_final_model, upstream_tokenizer
from trinity.optim.groups import TrinityOptimizer, build_optimizer
from trinity.rl.grpo import GrpoStats, group_advantages, grpo_loss, policy_batch, token_logprobs
from trinity.rl.rollout import Rollout, rl_problems, rollout, rollout_generator
from trinity.spec.stages import RLSpec

__all__ = ["run_rl_node", "verify_training_node"]

PHASE = "rl"
HELDOUT_PROBLEMS = 64


def grpo_update(
    policy: TrinityModel,
    reference: TrinityModel,
    optimizer: TrinityOptimizer,
    ro: Rollout,
    rl: RLSpec,
    pad_id: int,
    grad_clip: float | None,
) -> tuple[GrpoStats, float]:
    """One optimizer step on a rollout; returns the loss statistics and the gradient norm."""
    device = module_device(policy)
    adv_B = to_device(group_advantages(ro.rewards_PG).reshape(-1), device)
    batch = to_device(policy_batch(ro.prompt_ids, ro.response_ids, ro.logprobs, pad_id), device)
    with torch.no_grad():
        ref_BT = token_logprobs(reference, batch.ids_BT, batch.targets_BT)
    logp_BT = token_logprobs(policy, batch.ids_BT, batch.targets_BT)
    loss, stats = grpo_loss(logp_BT, batch.old_logprobs_BT, adv_B, batch.mask_BT, rl.clip_eps, rl.kl_weight, ref_BT)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"the RL loss is {loss.item()}")
    if not bool((adv_B != 0).any()):
        # No group has a reward spread: the policy gradient is zero and what remains is rounding
        # noise, which Muon's orthogonalisation (and Adam's normalisation) would blow up to a
        # full-size update. Skip the step.
        optimizer.zero_grad(set_to_none=True)
        return stats, 0.0
    loss.backward()  # type: ignore[no-untyped-call]
    params = [p for p in policy.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, grad_norm


@dataclass
class RLStep:
    """One GRPO step: its rollout and its update (tokens: response tokens trained on)."""

    loss: float
    tokens: int
    reward: float
    grad_norm: float
    stats: GrpoStats
    rollout: Rollout


class GrpoTrainer(TrainingLoop[RLStep]):
    """The RL kind of training node on the shared skeleton: a rollout and a GRPO update per step."""

    progress_every_s = 0.0  # every step: RL steps are few and slow

    def __init__(self, ctx: NodeContext, policy: TrinityModel, reference: TrinityModel, tok: Tokenizer) -> None:
        rl = ctx.spec.stages.rl
        assert rl is not None
        super().__init__(ctx, PHASE, 0, rl.steps)
        self.rl, self.policy, self.reference, self.tok = rl, policy, reference, tok
        self.optimizer = build_optimizer(policy, ctx.spec.optim)
        for group in self.optimizer.param_groups:
            group["base_lr"] = rl.lr
        self.optimizer.set_lr_factor(1.0)
        self.metrics: dict[str, Any] = {}

    def optimizer_step(self) -> RLStep:
        spec, rl = self.ctx.spec, self.rl
        self.policy.eval()
        ro = rollout(
            self.policy,
            self.tok,
            rl_problems(spec.seed, self.step, rl.prompts_per_step),
            rl.group_size,
            rl.max_new_tokens,
            rl.temperature,
            rl.top_p,
            rl.format_reward,
            rollout_generator(spec.seed, self.step),
        )
        self.policy.train()
        try:
            stats, grad_norm = grpo_update(
                self.policy, self.reference, self.optimizer, ro, rl, self.tok.pad_id, spec.stability.grad_clip
            )
        except NonFiniteLoss as exc:  # numbered as in telemetry: self.step steps are done
            raise NodeFailure(
                f"step {self.step + 1}: {exc}; nothing of this step was applied. "
                + divergence_advice(spec, self.ctx.kind, self.ctx.run.root)
            ) from None
        return RLStep(stats.loss, stats.tokens, float(ro.rewards_PG.mean()), grad_norm, stats, ro)

    def log_step(self, r: RLStep, seconds: float) -> None:
        assert self.telemetry is not None
        lrs = {g.get("name", ""): g["lr"] for g in self.optimizer.param_groups}
        self.telemetry.log_step(
            self.step,
            tokens=self.tokens,
            loss=r.loss,
            lr_muon=lrs.get("muon"),
            lr_adamw=lrs.get("adamw_decay"),
            grad_norm=r.grad_norm,
            tokens_per_s=r.tokens / seconds,
            step_time_s=seconds,
            phase=PHASE,
        )
        ro = r.rollout
        self.telemetry.log_event(
            self.step,
            "rl",
            reward=r.reward,
            pass_rate=float(ro.correct_PG.float().mean()),
            format_rate=float(ro.formatted_PG.float().mean()),
            response_length=sum(len(x) for x in ro.response_ids) / len(ro.response_ids),
            kl=r.stats.kl,
            clip_fraction=r.stats.clip_fraction,
            ratio_mean=r.stats.ratio_mean,
            zero_advantage_groups=int((ro.rewards_PG.std(dim=1) == 0).sum()),
            updated=int(r.grad_norm > 0),
        )

    def progress_values(self, r: RLStep) -> dict[str, Any]:
        return {"reward": round(r.reward, 4)}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def begin(self) -> None:
        if self.step == 0:  # the SFT starting point
            self.metrics["heldout_reward_start"] = self._heldout()

    def end(self, last: RLStep | None) -> dict[str, Any]:
        self.metrics["heldout_reward_end"] = self._heldout()
        return self.metrics

    def _heldout(self) -> float:
        """The held-out check at this step: `rl_heldout` rows of `evals`, and the mean reward."""
        assert self.telemetry is not None
        spec, rl = self.ctx.spec, self.rl
        problems = heldout_problems(spec.seed, HELDOUT_PROBLEMS, trained_prompts(spec))
        r = evaluate_arithmetic(
            self.policy, self.tok, problems, format_reward=rl.format_reward, max_new_tokens=rl.max_new_tokens
        )
        for metric in ("reward", "accuracy", "format_rate", "response_length"):
            self.telemetry.log_eval(self.step, "rl_heldout", r[metric], n=r["n"], metric=metric)
        return float(r["reward"])


def run_rl_node(ctx: NodeContext) -> dict[str, Any]:
    if ctx.spec.stages.rl is None:
        raise NodeFailure("the graph has no stages.rl")
    set_threads(ctx)
    tok = upstream_tokenizer(ctx)
    init = ctx.spec.stages.rl.init
    if init is None:
        reference, _ = load_final_model(ctx.dep_dir("sft"), ctx.spec.model)
    else:  # the policy and the KL reference start from the source (every attempt: the reference is not saved)
        if init.optimizer:
            raise NodeFailure("stages.rl.init.optimizer: RL builds its own optimizer (constant lr); set it to false")
        reference = TrinityModel(ctx.spec.model)
        load_init(ctx, init, SimpleNamespace(model=reference, optimizer=None), None)
        reference.eval()
    reference = reference.to(training_device())
    policy = copy.deepcopy(reference)  # SFT's weights, without initialising a model only to overwrite it
    reference.requires_grad_(False)
    return GrpoTrainer(ctx, policy, reference, tok).run()
