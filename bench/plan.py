"""`trinity plan` of each preset: the old algorithm (baseline) against the current one, side by side (prints JSON).

The baseline is the planning code of commit 3f3430e, copied below (`baseline_*`, nothing else
in this file is old): `build_plan` evaluated `estimate(spec)` as the default of a `dict.get` for
every node, so each node re-estimated the whole experiment, and `estimate` counted the
pretraining steps with a loop over every optimizer step. The current code estimates each sweep
branch once (a node reads its branch's estimate) and counts steps in closed form on the spec
(`ExperimentSpec.pretrain_steps`, `OptimSpec.batch_steps`, `ExtendSpec/SFTSpec.optimizer_steps`).
The parameter, FLOP and memory functions the baseline calls are the unchanged ones of
`trinity.graph.estimates`. Before timing, the benchmark checks that both give the same nodes (ids, identities, tokens,
steps, GPU-hours; in the keys the baseline has).

Two measurements per preset, the two algorithms alternating, best of `--repeats`:
- `plan_s`: `build_plan` alone, in this process, on the already loaded spec;
- `cli_s`: the whole command (`trinity plan --json GRAPH` in a fresh interpreter: imports,
  YAML loading, planning, printing), through `trinity.cli` with `build_plan` swapped for the
  baseline in the baseline's run. The acceptance figure: under 2 s per preset.
Ratios are baseline / current (how many times faster).

    python bench/plan.py [--repeats 3] [--graphs trinity-nano,trinity-mini,trinity-large] [--out bench/plan.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trinity.graph.compile import Node, branches, compile_graph, nodes_in_order
from trinity.graph.estimates import (
    Estimates,
    StageCost,
    checkpoint_bytes,
    count_params,
    flops_per_token,
    memory_per_gpu,
)
from trinity.graph.plan import build_plan
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.loading import LoadedSpec, load_experiment

ROOT = Path(__file__).resolve().parents[1]


# -- baseline: trinity/graph/estimates.py and plan.py as of 3f3430e -------------------------------
def baseline_pretrain_steps(spec: ExperimentSpec) -> list[int]:
    """Optimizer steps of each pretraining phase, following the batch-size schedule by tokens seen."""
    steps: list[int] = []
    seen = 0
    for phase in spec.data.phases:
        end = seen + phase.tokens
        n = 0
        while seen < end:
            seen += spec.optim.batch_sequences_at(seen) * phase.seq_len
            n += 1
        steps.append(n)
    return steps


def baseline_estimate(spec: ExperimentSpec) -> Estimates:
    """Estimates for the whole experiment (memory at the pretraining sequence length)."""
    m, par = spec.model, spec.parallel
    c = count_params(m)
    peak = par.accelerator.peak_bf16_tflops * 1e12 * par.mfu

    def cost(stage: str, tokens: int, seq_len: int, steps: int, flops_per_tok: float) -> StageCost:
        flops = flops_per_tok * tokens
        return StageCost(stage, tokens, seq_len, steps, flops, flops / peak / 3600)

    stages = [
        cost(f"pretrain:{p.name}", p.tokens, p.seq_len, n, flops_per_token(m, p.seq_len))
        for p, n in zip(spec.data.phases, baseline_pretrain_steps(spec), strict=True)
    ]
    memory = memory_per_gpu(m, par, spec.data.max_seq_len)
    if (ext := spec.stages.extend) is not None:
        steps = math.ceil(ext.tokens / (ext.global_batch_sequences * ext.seq_len))
        stages.append(cost("extend", ext.tokens, ext.seq_len, steps, flops_per_token(m, ext.seq_len)))
        ext_memory = memory_per_gpu(m, par, ext.seq_len, ext.cp)
        memory = max(memory, ext_memory, key=lambda e: e.total)
    if (sft := spec.stages.sft) is not None:
        steps = math.ceil(sft.tokens / (sft.global_batch_sequences * sft.seq_len))
        stages.append(cost("sft", sft.tokens, sft.seq_len, steps, flops_per_token(m, sft.seq_len)))
    if (rl := spec.stages.rl) is not None:
        tokens = rl.steps * rl.prompts_per_step * rl.group_size * rl.max_new_tokens
        per_token = flops_per_token(m, rl.max_new_tokens) * 8 / 6
        stages.append(cost("rl", tokens, rl.max_new_tokens, rl.steps, per_token))
    breakdown = {k: v for k, v in asdict(memory).items()}
    return Estimates(
        total_params=c.total,
        active_params=c.active,
        active_params_non_embedding=c.active_non_embedding,
        flops_per_token=flops_per_token(m, spec.data.max_seq_len),
        memory_per_gpu_bytes=memory.total,
        memory_breakdown=breakdown,
        memory_fits=memory.total <= par.accelerator.memory_gib * 1024**3,
        checkpoint_bytes=checkpoint_bytes(m),
        gpu_hours=sum(s.gpu_hours for s in stages),
        world_size=par.total_ranks,
        stages=stages,
    )


def baseline_node_cost(node: Node, est: Estimates) -> StageCost | None:
    name = {"pretrain": f"pretrain:{node.target}", "extend": "extend", "sft": "sft", "rl": "rl"}.get(node.kind)
    return next((s for s in est.stages if s.stage == name), None)


def baseline_build_plan(loaded: LoadedSpec) -> dict[str, Any]:
    graph = compile_graph(loaded)
    per_branch = {b.label: baseline_estimate(b.spec) for b in branches(loaded)}
    first = next(iter(per_branch.values()))
    nodes: list[dict[str, Any]] = []
    total_hours = 0.0
    for node in nodes_in_order(graph):
        spec: ExperimentSpec = graph.nodes[node.id]["spec"]
        label = node.branch or next(iter(per_branch))
        cost = baseline_node_cost(node, per_branch.get(label, baseline_estimate(spec)))  # re-estimates per node
        entry = node.to_json()
        if cost is not None:
            entry.update(tokens=cost.tokens, seq_len=cost.seq_len, steps=cost.steps, gpu_hours=cost.gpu_hours)
            total_hours += cost.gpu_hours
        nodes.append(entry)
    plan: dict[str, Any] = {
        "name": loaded.spec.name,
        "description": loaded.spec.description,
        "nodes": nodes,
        "estimates": {**first.to_json(), "graph_gpu_hours": total_hours},
    }
    if loaded.spec.sweep is not None:
        plan["branches"] = [{"label": k, "estimates": v.to_json()} for k, v in per_branch.items()]
    return plan


# -- measurement ----------------------------------------------------------------------------------
PLANNERS: dict[str, Callable[[LoadedSpec], dict[str, Any]]] = {"baseline": baseline_build_plan, "current": build_plan}


def run_cli(algorithm: str, graph: Path) -> None:
    """`trinity plan --json GRAPH` as the installed command runs it, with the chosen `build_plan`."""
    import trinity.cli
    import trinity.graph.plan

    trinity.graph.plan.build_plan = PLANNERS[algorithm]  # type: ignore[assignment]  # the CLI imports it per call
    sys.argv = ["trinity", "plan", "--json", str(graph)]
    trinity.cli.main()


def cli_seconds(algorithm: str, graph: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--_cli", algorithm, str(graph)], check=True, stdout=subprocess.DEVNULL, cwd=ROOT
    )
    return time.perf_counter() - t0


def shared_part(baseline: Any, current: Any) -> Any:
    """`current` cut down to the keys `baseline` has (recursively): the plan has grown keys since the
    baseline (days, the schedule), and what both compute must be the same."""
    if isinstance(baseline, dict) and isinstance(current, dict):
        return {k: shared_part(v, current.get(k)) for k, v in baseline.items()}
    if isinstance(baseline, list) and isinstance(current, list) and len(baseline) == len(current):
        return [shared_part(b, c) for b, c in zip(baseline, current, strict=True)]
    return current


def measure(graph: Path, repeats: int) -> dict[str, Any]:
    loaded = load_experiment(graph)
    plans = {name: plan(loaded) for name, plan in PLANNERS.items()}
    # The nodes (ids, identities, tokens, steps, GPU-hours): what the two algorithms compute differently. The
    # estimates' memory model has changed since the baseline (activation checkpointing, the fused head).
    base_nodes = plans["baseline"]["nodes"]
    same = json.dumps(shared_part(base_nodes, plans["current"]["nodes"])) == json.dumps(base_nodes)
    plan_s: dict[str, list[float]] = {name: [] for name in PLANNERS}
    cli_s: dict[str, list[float]] = {name: [] for name in PLANNERS}
    for _ in range(repeats):
        for name, plan in PLANNERS.items():
            t0 = time.perf_counter()
            plan(loaded)
            plan_s[name].append(time.perf_counter() - t0)
        for name in PLANNERS:
            cli_s[name].append(cli_seconds(name, graph))
    costed = [n for n in plans["current"]["nodes"] if "steps" in n]
    n_nodes, n_branches = len(plans["current"]["nodes"]), len(branches(loaded))
    return {
        "graph": str(graph.relative_to(ROOT)),
        "identical_plans": same,
        "nodes": n_nodes,
        "pretrain_steps": sum(n["steps"] for n in costed if n["kind"] == "pretrain"),
        "estimate_calls": {"baseline": n_branches + n_nodes, "current": n_branches},
        "plan_s": {name: min(v) for name, v in plan_s.items()},
        "plan_speedup": min(plan_s["baseline"]) / min(plan_s["current"]),
        "cli_s": {name: min(v) for name, v in cli_s.items()},
        "cli_speedup": min(cli_s["baseline"]) / min(cli_s["current"]),
        "all_s": {"plan": plan_s, "cli": cli_s},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--graphs", default="trinity-nano,trinity-mini,trinity-large", help="names under graphs/")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--_cli", nargs=2, metavar=("ALGORITHM", "GRAPH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._cli:
        run_cli(args._cli[0], Path(args._cli[1]))
        return
    load = os.getloadavg()
    results = [measure(ROOT / "graphs" / f"{name}.yaml", args.repeats) for name in args.graphs.split(",")]
    result = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_average_before_after": [round(load[0], 2), round(os.getloadavg()[0], 2)],
        "repeats": args.repeats,
        "results": results,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
