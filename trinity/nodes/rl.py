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
`(data->>'reward')::double`). Checkpoints (model, optimizer, RNG, step) every
`execution.checkpoint_every` steps, at the end and on a stop request; problems and the sampling
generator depend only on (seed, step), so a resumed run is exact.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from trinity.data.tokenizer import Tokenizer
from trinity.errors import NodeFailure, StopRequested
from trinity.evals.arithmetic import evaluate_arithmetic, heldout_problems, trained_prompts
from trinity.model import TrinityModel
from trinity.nodes.checkpoints import resume_state, save_training_state, write_final
from trinity.nodes.context import NodeContext
from trinity.nodes.pretrain import set_threads, verify_training_node
from trinity.nodes.seeds import capture_rng_state, restore_rng_state
from trinity.nodes.trainer import record_resume
from trinity.nodes.upstream import load_final_model, upstream_tokenizer
from trinity.optim.groups import TrinityOptimizer, build_optimizer
from trinity.rl.grpo import GrpoStats, group_advantages, grpo_loss, policy_batch, token_logprobs
from trinity.rl.rollout import Rollout, rl_problems, rollout, rollout_generator
from trinity.spec.stages import RLSpec
from trinity.store.checkpoint import latest_checkpoint
from trinity.store.telemetry import TelemetryWriter

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
    adv_B = group_advantages(ro.rewards_PG).reshape(-1)
    batch = policy_batch(ro.prompt_ids, ro.response_ids, ro.logprobs, pad_id)
    with torch.no_grad():
        ref_BT = token_logprobs(reference, batch.ids_BT, batch.targets_BT)
    logp_BT = token_logprobs(policy, batch.ids_BT, batch.targets_BT)
    loss, stats = grpo_loss(logp_BT, batch.old_logprobs_BT, adv_B, batch.mask_BT, rl.clip_eps, rl.kl_weight, ref_BT)
    if not torch.isfinite(loss):
        raise NodeFailure(f"RL loss is {loss.item()}; lower stages.rl.lr, then `trinity resume`")
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


def _heldout(ctx: NodeContext, model: TrinityModel, tok: Tokenizer, step: int, telemetry: TelemetryWriter) -> float:
    spec, rl = ctx.spec, ctx.spec.stages.rl
    assert rl is not None
    problems = heldout_problems(spec.seed, HELDOUT_PROBLEMS, trained_prompts(spec))
    r = evaluate_arithmetic(model, tok, problems, format_reward=rl.format_reward, max_new_tokens=rl.max_new_tokens)
    for metric in ("reward", "accuracy", "format_rate", "response_length"):
        telemetry.log_eval(step, "rl_heldout", r[metric], n=r["n"], metric=metric)
    return float(r["reward"])


def run_rl_node(ctx: NodeContext) -> dict[str, Any]:
    spec = ctx.spec
    rl = spec.stages.rl
    if rl is None:
        raise NodeFailure("the graph has no stages.rl")
    set_threads(ctx)
    tok = upstream_tokenizer(ctx)
    reference, _ = load_final_model(ctx.dep_dir("sft"), spec.model)
    for p in reference.parameters():
        p.requires_grad_(False)
    policy = TrinityModel(spec.model)
    policy.load_state_dict(reference.state_dict())
    optimizer = build_optimizer(policy, spec.optim)
    for group in optimizer.param_groups:
        group["base_lr"] = rl.lr
    optimizer.set_lr_factor(1.0)
    step, tokens = 0, 0
    resumed = resume_state(ctx.dir, ctx.node.identity)
    if resumed is not None:
        policy.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        restore_rng_state(resumed["rng"])
        step, tokens = int(resumed["step"]), int(resumed["tokens"])
        record_resume(ctx, step)

    telemetry = TelemetryWriter(ctx.dir, ctx.node_id, ctx.attempt, ctx.run_id)
    ctx.checks_stop = True
    last_ckpt = None
    metrics: dict[str, Any] = {}
    try:
        if step == 0:
            metrics["heldout_reward_start"] = _heldout(ctx, policy, tok, 0, telemetry)
        while step < rl.steps:
            t0 = time.perf_counter()
            policy.eval()
            ro = rollout(
                policy,
                tok,
                rl_problems(spec.seed, step, rl.prompts_per_step),
                rl.group_size,
                rl.max_new_tokens,
                rl.temperature,
                rl.top_p,
                rl.format_reward,
                rollout_generator(spec.seed, step),
            )
            policy.train()
            stats, grad_norm = grpo_update(policy, reference, optimizer, ro, rl, tok.pad_id, spec.stability.grad_clip)
            step += 1
            tokens += stats.tokens
            seconds = time.perf_counter() - t0
            lrs = {g.get("name", ""): g["lr"] for g in optimizer.param_groups}
            telemetry.log_step(
                step,
                tokens=tokens,
                loss=stats.loss,
                lr_muon=lrs.get("muon"),
                lr_adamw=lrs.get("adamw_decay"),
                grad_norm=grad_norm,
                tokens_per_s=stats.tokens / seconds,
                step_time_s=seconds,
                phase=PHASE,
            )
            zero_groups = int((ro.rewards_PG.std(dim=1) == 0).sum())
            reward = float(ro.rewards_PG.mean())
            telemetry.log_event(
                step,
                "rl",
                reward=reward,
                pass_rate=float(ro.correct_PG.float().mean()),
                format_rate=float(ro.formatted_PG.float().mean()),
                response_length=sum(len(r) for r in ro.response_ids) / len(ro.response_ids),
                kl=stats.kl,
                clip_fraction=stats.clip_fraction,
                ratio_mean=stats.ratio_mean,
                zero_advantage_groups=zero_groups,
                updated=int(grad_norm > 0),
            )
            ctx.progress(
                step=step,
                total_steps=rl.steps,
                loss=round(stats.loss, 4),
                reward=round(reward, 4),
                tokens_per_s=round(stats.tokens / seconds),
                tokens=tokens,
            )
            stop = ctx.stop_event.is_set()
            if step == rl.steps or stop or step % spec.execution.checkpoint_every == 0:
                telemetry.flush()
                last_ckpt = _checkpoint(ctx, policy, optimizer, step, tokens)
            if stop and step < rl.steps:
                raise StopRequested()
        if last_ckpt is None:  # resumed at the last step: the final checkpoint is the resumed one
            last_ckpt = latest_checkpoint(ctx.dir.checkpoints)
        metrics["heldout_reward_end"] = _heldout(ctx, policy, tok, step, telemetry)
    finally:
        telemetry.close()
    assert last_ckpt is not None
    write_final(ctx.dir, last_ckpt, step, tokens, metrics)
    return metrics


def _checkpoint(ctx: NodeContext, model: TrinityModel, optimizer: TrinityOptimizer, step: int, tokens: int) -> Any:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng_state(),
        "step": step,
        "tokens": tokens,
        "identity": ctx.node.identity,
        "phase": PHASE,
    }
    return save_training_state(ctx.dir, step, state, ctx.spec.execution.keep_last)
