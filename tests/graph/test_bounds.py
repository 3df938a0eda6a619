"""Upper bounds on sizes (the `le=` of the spec models): an absurd value is a located error at
`validate`, every preset stays inside them, and `plan` at a bound finishes (the step counts are
closed form, `tests/graph/test_steps.py`; everything per layer or per branch is bounded).

No wall-clock time is asserted: a plan that hangs is ended by the subprocess timeout and fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trinity.errors import SpecError
from trinity.spec.data import MAX_SEQ_LEN, MAX_TOKENS
from trinity.spec.loading import load_experiment
from trinity.spec.model import MAX_EXPERTS, MAX_LAYERS, MAX_WIDTH

LARGE = ROOT / "graphs" / "trinity-large.yaml"
TINY = ROOT / "graphs" / "tiny.yaml"
PRESETS = sorted((ROOT / "graphs").glob("**/*.yaml")) + sorted((ROOT / "tests" / "graphs").glob("*.yaml"))


def plan(graph: str, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [arg for s in sets for arg in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "trinity.cli", "plan", graph, *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )


# (field, a value just past its bound, the bound the message must name)
PAST_THE_BOUND = [
    ("data.phases.0.tokens", MAX_TOKENS + 1, MAX_TOKENS),
    ("data.phases.0.seq_len", MAX_SEQ_LEN + 1, MAX_SEQ_LEN),
    ("model.n_layers", MAX_LAYERS + 1, MAX_LAYERS),
    ("model.d_model", MAX_WIDTH + 1, MAX_WIDTH),
    ("model.moe.n_experts", MAX_EXPERTS + 1, MAX_EXPERTS),
    ("optim.batch.0.sequences", 2**24 + 1, 2**24),
    ("stages.sft.tokens", MAX_TOKENS + 1, MAX_TOKENS),
    ("stages.rl.steps", 10**9 + 1, 10**9),
    ("parallel.nodes", 2**16 + 1, 2**16),
    ("seed", 2**63, 2**63 - 1),
    ("execution.heartbeat_s", 3601, 3600),
    ("execution.checkpoint.every", 10**9 + 1, 10**9),
    ("execution.checkpoint.keep_last", 10_001, 10_000),
    ("execution.checkpoint.keep_every", 10**9 + 1, 10**9),
    ("execution.slurm.cpus_per_task", 4097, 4096),
    ("execution.slurm.time_min.default", 525_601, 525_600),
    ("execution.local.threads", 4097, 4096),
]


@pytest.mark.parametrize(("field", "value", "bound"), PAST_THE_BOUND, ids=[f for f, _, _ in PAST_THE_BOUND])
def test_a_value_past_its_bound_is_a_located_error(field: str, value: int, bound: int) -> None:
    with pytest.raises(SpecError) as info:
        load_experiment(TINY, [f"{field}={value}"])
    assert any(
        line.startswith(f"--set #1 ({field}={value}): {field} = {value}") and f"less than or equal to {bound}" in line
        for line in info.value.lines
    ), info.value.lines


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(ROOT)) for p in PRESETS])
def test_every_preset_is_inside_the_bounds(path: Path) -> None:
    load_experiment(path)


def test_the_largest_preset_plans_at_the_token_bound() -> None:
    # 1e16 tokens in every phase: 1e16 / (16384 x 8192) = 74.5M steps per phase, counted in closed form.
    sets = [f"data.phases.{i}.tokens={MAX_TOKENS}" for i in range(3)]
    result = plan(str(LARGE), *sets)
    assert result.returncode == 0, result.stderr
    nodes = {n["id"]: n for n in json.loads(result.stdout)["nodes"]}
    # Phase 1 starts at 12288 x 8192 tokens a step and switches to 16384 x 8192 after 4.9T tokens.
    small, large = 12288 * 8192, 16384 * 8192
    first = -(-4_900_000_000_000 // small)
    seen = first * small
    assert nodes["pretrain/phase1"]["steps"] == first + -(-(MAX_TOKENS - seen) // large)
    assert nodes["pretrain/phase1"]["tokens"] == MAX_TOKENS


def test_plan_past_a_bound_ends_at_once_with_exit_2() -> None:
    # Each of these used to run for minutes or never end (a tuple of 1e9 layer types, a step loop).
    for field, value in (("model.n_layers", 10**9), ("data.phases.0.tokens", 10**35)):
        result = plan(str(TINY), f"{field}={value}")
        assert result.returncode == 2 and field in result.stderr, result.stderr


# -- execution.checkpoint: the section and the older spelling of its fields -----------------------


def test_the_older_checkpoint_fields_still_read_into_the_section(small_graph: Path) -> None:
    """Run directories hold spec.yaml files written before `execution.checkpoint` existed: `resume` re-reads
    them. checkpoint_every / keep_last land in checkpoint.every / keep_last; the rest keeps its defaults."""
    small_graph.write_text(small_graph.read_text() + "  checkpoint_every: 7\n  keep_last: 3\n")
    section = load_experiment(small_graph).spec.execution.checkpoint
    assert (section.every, section.keep_last, section.keep_every, section.async_) == (7, 3, None, None)


@pytest.mark.parametrize(("old", "new"), [("checkpoint_every", "every"), ("keep_last", "keep_last")])
def test_a_setting_under_both_names_is_an_error_naming_both(old: str, new: str) -> None:
    with pytest.raises(SpecError) as info:
        load_experiment(TINY, [f"execution.{old}=4"])  # tiny.yaml sets checkpoint.every and keep_last
    assert any(f"execution.{old} and execution.checkpoint.{new} are both given" in line for line in info.value.lines)


def test_an_older_field_past_its_bound_names_its_older_name(small_graph: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_experiment(small_graph, ["execution.keep_last=10001"])
    assert any(
        "execution.keep_last = 10001 (the older name of checkpoint.keep_last)" in line
        and "less than or equal to 10000" in line
        for line in info.value.lines
    ), info.value.lines


def test_async_is_spelled_async_everywhere_a_user_sees_it() -> None:
    """`async` is a Python keyword (the field is async_): --set, errors and the schema all say `async`."""
    assert load_experiment(TINY, ["execution.checkpoint.async=true"]).spec.execution.checkpoint.async_ is True
    with pytest.raises(SpecError) as info:
        load_experiment(TINY, ["execution.checkpoint.async=maybe"])
    assert any(line.startswith("--set #1 (execution.checkpoint.async=maybe): execution.checkpoint.async = ")
               for line in info.value.lines), info.value.lines  # fmt: skip
    with pytest.raises(SpecError) as info:
        load_experiment(TINY, ["execution.checkpoint.asink=true"])
    assert any("allowed: async, compression, every, keep_every, keep_last" in line for line in info.value.lines)
    schema = json.loads(subprocess.run(
        [sys.executable, "-m", "trinity.cli", "schema"], capture_output=True, text=True, timeout=60, check=True
    ).stdout)  # fmt: skip
    fields = schema["$defs"]["CheckpointSpec"]["properties"]
    assert "async" in fields and "async_" not in fields and "background thread" in fields["async"]["description"]
