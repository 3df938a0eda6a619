"""The plan: the DAG's nodes with their identity and cost, the experiment's estimates, and the pretraining
schedule (loaders per phase, warmup, where the lr decay starts), as JSON.

Days of wall time are GPU-hours over the GPUs of the node's layout (parallel.nodes x gpus_per_node):
GPU-hours / GPUs / 24. The whole graph's days add its training nodes' days (they run one after
another); GPU-hours come from the declared MFU (trinity.graph.estimates), and so do the days.
"""

from __future__ import annotations

import math
from typing import Any

from trinity.graph.compile import Node, branches, compile_graph, nodes_in_order
from trinity.graph.estimates import Estimates, StageCost, estimate
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.loading import LoadedSpec

HOURS_PER_DAY = 24


def node_cost(node: Node, est: Estimates) -> StageCost | None:
    """The stage cost a training node accounts for (None for CPU-side and eval nodes)."""
    name = {"pretrain": f"pretrain:{node.target}", "extend": "extend", "sft": "sft", "rl": "rl"}.get(node.kind)
    return next((s for s in est.stages if s.stage == name), None)


def wall_days(gpu_hours: float, gpus: int) -> float:
    """Days of wall time that `gpu_hours` take on `gpus` GPUs working together."""
    return gpu_hours / gpus / HOURS_PER_DAY


def first_decayed_step(spec: ExperimentSpec, start: int) -> tuple[int | None, str | None]:
    """The first optimizer step (0-based, counted across phases) whose lr is below the peak by the decay, and
    its phase: the first step that begins with more than `start` tokens seen (`pretrain_lr_factor` decays
    once tokens seen exceed the decay start). (None, None) when no step does."""
    seen, first = 0, 0
    for phase, steps in zip(spec.data.phases, spec.pretrain_steps(), strict=True):
        _, end = spec.optim.batch_steps(seen, phase.tokens, phase.seq_len)
        if start < end:
            # Steps of this phase that begin with at most `start` tokens seen: they run at the peak.
            at_peak = spec.optim.batch_steps(seen, start + 1 - seen, phase.seq_len)[0] if start >= seen else 0
            if at_peak < steps:
                return first + at_peak, phase.name
        seen, first = end, first + steps
    return None, None


def schedule_plan(spec: ExperimentSpec) -> dict[str, Any]:
    """The pretraining schedule `trinity plan` shows: per phase its steps and loader, then the lr schedule.

    Keys: `phases` (name, tokens, seq_len, first_step, steps, loader: the phase's loader section,
    lr: "optim.schedule" or the phase's own rule), `warmup_steps`, `decay`, `final_fraction`,
    `decay_start_tokens` (the tokens seen after which the lr decays, whichever field set it, rounded
    down), `decay_start_field` (`decay_start_tokens` or `decay_fraction`), `decay_fraction` (the
    fraction of all pretraining tokens the decay covers), `decay_start_step` and `decay_start_phase`
    (the first optimizer step with a decayed lr and its phase; null when none), `total_tokens`,
    `total_steps`.
    """
    sched, total = spec.optim.schedule, spec.data.pretrain_tokens
    start = math.floor(sched.decay_start(total))
    step, phase = first_decayed_step(spec, start)
    phases: list[dict[str, Any]] = []
    first = 0
    for p, steps in zip(spec.data.phases, spec.pretrain_steps(), strict=True):
        phases.append(
            {
                "name": p.name,
                "tokens": p.tokens,
                "seq_len": p.seq_len,
                "first_step": first,
                "steps": steps,
                "loader": p.loader.model_dump(mode="json"),
                "lr": "optim.schedule" if p.lr is None else p.lr.model_dump(mode="json"),
            }
        )
        first += steps
    return {
        "phases": phases,
        "warmup_steps": sched.warmup_steps,
        "decay": sched.decay,
        "final_fraction": sched.final_fraction,
        "decay_start_tokens": start,
        "decay_start_field": "decay_fraction" if sched.decay_start_tokens is None else "decay_start_tokens",
        "decay_fraction": (total - sched.decay_start(total)) / total,
        "decay_start_step": step,
        "decay_start_phase": phase,
        "total_tokens": total,
        "total_steps": first,
    }


def build_plan(loaded: LoadedSpec) -> dict[str, Any]:
    """Everything `trinity plan --json` prints.

    Beside the nodes (with `tokens`, `seq_len`, `steps`, `gpu_hours` and `days` on training nodes) and
    the estimates (with `graph_gpu_hours`, `graph_days`, `pretrain_gpu_hours`, `pretrain_days` added),
    `schedule` is the first branch's `schedule_plan` (a sweep's branches carry their own).
    """
    graph = compile_graph(loaded)
    specs = {b.label: b.spec for b in branches(loaded)}
    per_branch = {label: estimate(spec) for label, spec in specs.items()}
    first_label = next(iter(per_branch))
    first = per_branch[first_label]
    nodes: list[dict[str, Any]] = []
    total_hours = total_days = 0.0
    for node in nodes_in_order(graph):
        # A node's cost is its branch's (a node shared by several branches: the first one's, whose spec it holds).
        est = per_branch[graph.nodes[node.id]["branch_label"] or first_label]
        cost = node_cost(node, est)
        entry = node.to_json()
        if cost is not None:
            days = wall_days(cost.gpu_hours, est.world_size)
            entry.update(
                tokens=cost.tokens, seq_len=cost.seq_len, steps=cost.steps, gpu_hours=cost.gpu_hours, days=days
            )
            total_hours += cost.gpu_hours
            total_days += days
        nodes.append(entry)
    plan: dict[str, Any] = {
        "name": loaded.spec.name,
        "description": loaded.spec.description,
        "nodes": nodes,
        "estimates": {
            **first.to_json(),
            **pretrain_totals(first),
            "graph_gpu_hours": total_hours,
            "graph_days": total_days,
        },
        "schedule": schedule_plan(specs[first_label]),
    }
    if loaded.spec.sweep is not None:
        plan["branches"] = [
            {"label": k, "estimates": {**v.to_json(), **pretrain_totals(v)}, "schedule": schedule_plan(specs[k])}
            for k, v in per_branch.items()
        ]
    return plan


def pretrain_totals(est: Estimates) -> dict[str, float]:
    """GPU-hours and days of wall time of the pretraining phases together."""
    hours = sum(s.gpu_hours for s in est.stages if s.stage.startswith("pretrain:"))
    return {"pretrain_gpu_hours": hours, "pretrain_days": wall_days(hours, est.world_size)}
