"""Optimizer step counts in closed form, checked against the per-step loop they replace.

The loop below is the reference: it is what `trinity.graph.estimates.pretrain_steps` did before
the step counts moved onto the spec models (`OptimSpec.batch_steps`, `ExperimentSpec.pretrain_steps`,
`ExtendSpec.optimizer_steps`, `SFTSpec.optimizer_steps`): one optimizer step at a time, each
taking the batch in force when it starts, until the budget is met or overshot.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from trinity.graph.compile import branches
from trinity.graph.estimates import Estimates, estimate
from trinity.graph.identity import identity_payload
from trinity.graph.plan import build_plan
from trinity.spec.data import MAX_TOKENS
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.loading import load_experiment
from trinity.spec.optim import BatchStep, OptimSpec
from trinity.spec.schema import graph_file_schema

TINY = ROOT / "graphs" / "tiny.yaml"
DERIVED = ("batch_steps", "pretrain_steps", "optimizer_steps", "whole_steps")


def loop_batch_steps(optim: OptimSpec, tokens_seen: int, tokens: int, seq_len: int) -> tuple[int, int, int]:
    """Reference: (steps, tokens seen after, steps that started in one batch entry and ended past the next's start)."""
    seen, end, n, crossing = tokens_seen, tokens_seen + tokens, 0, 0
    while seen < end:
        before = seen
        seen += optim.batch_sequences_at(seen) * seq_len
        n += 1
        crossing += any(before < b.start_tokens < seen for b in optim.batch)
    return n, seen, crossing


def loop_pretrain_steps(spec: ExperimentSpec) -> list[int]:
    """Reference: the per-step loop over the phases, tokens seen carried from phase to phase."""
    steps, seen = [], 0
    for phase in spec.data.phases:
        n, seen, _ = loop_batch_steps(spec.optim, seen, phase.tokens, phase.seq_len)
        steps.append(n)
    return steps


def schedule(*entries: tuple[int, int]) -> OptimSpec:
    return OptimSpec(batch=tuple(BatchStep(start_tokens=s, sequences=q) for s, q in entries))


def random_schedule(rng: random.Random, step_hint: int) -> OptimSpec:
    """1-5 entries; starts either on a multiple of a likely step size or anywhere (mid-step)."""
    starts = [0]
    for _ in range(rng.randrange(5)):
        gap = rng.randint(1, 6) * step_hint if rng.random() < 0.3 else rng.randint(1, 5 * step_hint)
        starts.append(starts[-1] + gap)
    return schedule(*((s, rng.randint(1, 8)) for s in starts))


EDGE_CASES = [
    # (schedule, tokens seen, budget, seq_len)
    (schedule((0, 4)), 0, 1, 1),  # one token: one whole step
    (schedule((0, 4)), 0, 40, 2),  # exact multiple: no extra step
    (schedule((0, 4)), 0, 41, 2),  # one token over: one more step
    (schedule((0, 2), (8, 4)), 0, 40, 2),  # the boundary falls on a step boundary
    (schedule((0, 2), (6, 4)), 0, 40, 2),  # the boundary falls mid-step: that step keeps the old batch
    (schedule((0, 4), (1, 1), (2, 8), (3, 2)), 0, 100, 4),  # several entries inside one step
    (schedule((0, 3), (50, 1)), 0, 10, 4),  # the budget ends before the first boundary
    (schedule((0, 3), (50, 1)), 48, 10, 4),  # starts just before a boundary, ends past it
    (schedule((0, 3), (50, 1)), 1000, 17, 4),  # starts past the last entry
    (schedule((0, 3), (12, 5), (13, 7)), 11, 1, 1),  # one step from just before a boundary
    (schedule((0, 4096), (7_000_000_000_000, 8192)), 0, 7_000_000_000_000, 4096),  # Nano's first phase
]


@pytest.mark.parametrize(("optim", "seen", "tokens", "seq_len"), EDGE_CASES)
def test_batch_steps_edge_cases_match_the_loop(optim: OptimSpec, seen: int, tokens: int, seq_len: int) -> None:
    if tokens > 10**9:  # the loop over a real phase takes ~0.4 s; the count it gives is recorded here
        assert optim.batch_steps(seen, tokens, seq_len) == (417_233, 417_233 * 4096 * 4096)
        return
    steps, after, _ = loop_batch_steps(optim, seen, tokens, seq_len)
    assert optim.batch_steps(seen, tokens, seq_len) == (steps, after)


def test_batch_steps_keep_the_old_batch_across_a_boundary() -> None:
    # Steps of 4 tokens from 0 (0, 4), the one from 4 crosses the entry at 6 and keeps 4 tokens;
    # from 8 on, steps of 8 tokens: 8, 16, 24, 32 -> 40. Six steps; a reading that switched
    # batch at the boundary would give 0, 4, 6, 14, ... instead.
    assert schedule((0, 2), (6, 4)).batch_steps(0, 40, 2) == (6, 40)


def test_batch_steps_match_the_loop_on_random_schedules() -> None:
    rng = random.Random(20261129)
    crossing_cases = 0
    for _ in range(2000):
        seq_len = rng.choice([1, 2, 3, 4, 7, 16])
        optim = random_schedule(rng, step_hint=4 * seq_len)
        seen = rng.choice([0, 0, rng.randrange(300)])
        tokens = rng.randint(1, 400)
        steps, after, crossing = loop_batch_steps(optim, seen, tokens, seq_len)
        assert optim.batch_steps(seen, tokens, seq_len) == (steps, after), (optim.batch, seen, tokens, seq_len)
        crossing_cases += crossing > 0
    assert crossing_cases > 300  # the random schedules do exercise pieces that end mid-step


@st.composite
def schedules_and_budgets(draw: st.DrawFn) -> tuple[OptimSpec, int, int, int]:
    """A schedule of 1-6 entries (gaps of any size, mid-step or not), tokens seen, budget, seq_len;
    sized so the reference loop stays under ~10k steps."""
    seq_len = draw(st.integers(1, 64))
    sequences = draw(st.lists(st.integers(1, 64), min_size=1, max_size=6))
    gaps = draw(st.lists(st.integers(1, 5000), min_size=len(sequences) - 1, max_size=len(sequences) - 1))
    starts = [0]
    for gap in gaps:
        starts.append(starts[-1] + gap)
    optim = schedule(*zip(starts, sequences, strict=True))
    seen = draw(st.integers(0, starts[-1] + 100))
    tokens = draw(st.integers(1, 10_000 * seq_len))
    return optim, seen, tokens, seq_len


@settings(max_examples=400, derandomize=True, deadline=None)
@given(schedules_and_budgets())
def test_batch_steps_match_the_loop_on_generated_schedules(case: tuple[OptimSpec, int, int, int]) -> None:
    optim, seen, tokens, seq_len = case
    steps, after, _ = loop_batch_steps(optim, seen, tokens, seq_len)
    assert optim.batch_steps(seen, tokens, seq_len) == (steps, after)


def test_batch_steps_at_the_token_bound_are_exact_integers() -> None:
    # 1e16 tokens: beyond 2**53, where a float ceil would be off; the closed form stays in integers.
    optim = schedule((0, 12288), (4_900_000_000_000, 16384))
    steps, after = optim.batch_steps(0, MAX_TOKENS, 8192)
    first = -(-4_900_000_000_000 // (12288 * 8192))
    rest = -(-(MAX_TOKENS - first * 12288 * 8192) // (16384 * 8192))
    assert (steps, after) == (first + rest, first * 12288 * 8192 + rest * 16384 * 8192)
    assert after >= MAX_TOKENS > after - 16384 * 8192


def test_pretrain_steps_match_the_loop_on_random_phases() -> None:
    base = load_experiment(TINY).spec
    phase = base.data.phases[0]
    rng = random.Random(7)
    for i in range(300):
        phases = tuple(
            phase.model_copy(update={"name": f"p{k}", "tokens": rng.randint(1, 500), "seq_len": rng.choice([1, 3, 8])})
            for k in range(rng.randint(1, 4))
        )
        optim = random_schedule(rng, step_hint=16)
        spec = base.model_copy(update={"optim": optim, "data": base.data.model_copy(update={"phases": phases})})
        assert list(spec.pretrain_steps()) == loop_pretrain_steps(spec), i


def test_pretrain_steps_of_tiny_and_large_match_the_loop() -> None:
    tiny = load_experiment(TINY).spec
    # phase1: 4096-token steps (16 x 256) until 300000 tokens: 74 steps (303104 tokens).
    # phase2: the batch is 32 x 256 = 8192 from 300000 tokens on: 160000 / 8192 -> 20 steps.
    # phase3: 100000 / 8192 -> 13 steps. Each phase trains at least its budget.
    assert tiny.pretrain_steps() == (74, 20, 13) == tuple(loop_pretrain_steps(tiny))
    large = load_experiment(ROOT / "graphs" / "trinity-large.yaml").spec  # 138k steps of the loop: ~0.1 s
    assert list(large.pretrain_steps()) == loop_pretrain_steps(large)


@pytest.mark.parametrize("name", ["nano", "mini"])
def test_pretrain_steps_of_nano_and_mini(name: str) -> None:
    # Recorded from the per-step loop (0.5-0.8 s per preset, too slow to repeat in every test run).
    spec = load_experiment(ROOT / "graphs" / f"trinity-{name}.yaml").spec
    assert spec.pretrain_steps() == (417_233, 53_645, 35_763)


def test_fixed_batch_stages_match_the_loop_and_the_float_ceil() -> None:
    rng = random.Random(3)
    ext = load_experiment(TINY).spec.stages.extend
    sft = load_experiment(TINY).spec.stages.sft
    assert ext is not None and sft is not None
    for _ in range(500):
        batch, seq_len = rng.randint(1, 9), rng.randint(1, 9)
        tokens = rng.choice([batch * seq_len * rng.randint(1, 20), rng.randint(1, 1000)])
        steps, _, _ = loop_batch_steps(schedule((0, batch)), 0, tokens, seq_len)
        for stage in (ext, sft):
            same = stage.model_copy(update={"tokens": tokens, "global_batch_sequences": batch, "seq_len": seq_len})
            assert same.optimizer_steps == steps == math.ceil(tokens / (batch * seq_len))


@pytest.mark.parametrize("name", ["tiny", "trinity-nano", "trinity-mini", "trinity-large"])
def test_fixed_batch_stages_of_the_presets(name: str) -> None:
    stages = load_experiment(ROOT / "graphs" / f"{name}.yaml").spec.stages
    for stage in (stages.extend, stages.sft):
        assert stage is not None
        assert stage.optimizer_steps == math.ceil(stage.tokens / (stage.global_batch_sequences * stage.seq_len))


def test_derived_values_are_neither_schema_nor_identity() -> None:
    schema = json.dumps(graph_file_schema())
    spec = load_experiment(TINY).spec
    payloads = json.dumps([identity_payload(spec), identity_payload(spec.optim)])
    for name in DERIVED:
        assert name not in schema
        assert name not in payloads
    assert "optimizer_steps" not in spec.model_dump_json()


def test_plan_estimates_each_branch_once_and_gives_each_node_its_branch_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def counting(spec: ExperimentSpec) -> Estimates:
        calls.append(spec.name)
        return estimate(spec)

    monkeypatch.setattr("trinity.graph.plan.estimate", counting)
    loaded = load_experiment(TINY, ["sweep={grid: {data.phases.phase1.tokens: [300000, 600000]}}"])
    plan = build_plan(loaded)
    assert len(calls) == 2  # once per branch, not once per node
    steps = {b.label: b.spec.pretrain_steps() for b in branches(loaded)}
    assert list(steps) == ["phase1.tokens=300000", "phase1.tokens=600000"]
    assert len(set(steps.values())) == 2  # every pretraining node differs between the branches
    by_id = {n["id"]: n for n in plan["nodes"]}
    for label, per_phase in steps.items():
        for phase, n in zip(("phase1", "phase2", "phase3"), per_phase, strict=True):
            assert by_id[f"pretrain/{phase}[{label}]"]["steps"] == n
