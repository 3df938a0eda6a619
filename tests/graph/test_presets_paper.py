"""The presets against the paper as `trinity plan` shows them: the loaders per phase (PAPER.md 5), where the
lr decay starts (checked against a step-by-step walk of the batch schedule and the lr factor), and days of
wall time (Large's pretraining: Arcee's published ~33 days on 2048 B300)."""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT
from trinity.cli import app
from trinity.optim.schedule import pretrain_lr_factor
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.loading import load_experiment

SEQUENTIAL = {"kind": "sequential", "workers": 1}
RSDB_LARGE = {"kind": "rsdb", "buffer_size": 4096, "workers": 4}
PAPER_LOADERS = {
    "nano": [SEQUENTIAL] * 3,
    "mini": [SEQUENTIAL] * 3,
    "large": [SEQUENTIAL, SEQUENTIAL, RSDB_LARGE],  # RSDB deployed for phase 3 only, 4096 per GPU over 4 workers
}
DECAY_START = {"nano": 8_800_000_000_000, "mini": 8_800_000_000_000, "large": 10_000_000_000_000}
PUBLISHED_LARGE_DAYS = 33.0
runner = CliRunner()


def plan_json(name: str) -> dict[str, Any]:
    """`trinity plan graphs/trinity-NAME.yaml --json`, in this process."""
    out = runner.invoke(app, ["plan", str(ROOT / "graphs" / f"trinity-{name}.yaml"), "--json"])
    assert out.exit_code == 0, out.output
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def walk_steps(spec: ExperimentSpec) -> list[int]:
    """Tokens seen before each pretraining step, one step at a time (each step takes the batch in force when it
    starts; a phase runs while fewer than its budget's end are seen)."""
    seen, before = 0, []
    for phase in spec.data.phases:
        end = seen + phase.tokens  # the next phase starts where this one's last step stopped
        while seen < end:
            before.append(seen)
            seen += spec.optim.batch_sequences_at(seen) * phase.seq_len
    return before


@pytest.mark.parametrize("name", ["nano", "mini", "large"])
def test_plan_json_shows_the_papers_loaders_decay_start_and_days(name: str) -> None:
    plan = plan_json(name)
    spec = load_experiment(ROOT / "graphs" / f"trinity-{name}.yaml").spec
    schedule = plan["schedule"]
    assert [p["loader"] for p in schedule["phases"]] == PAPER_LOADERS[name]
    assert schedule["decay_start_tokens"] == DECAY_START[name]
    assert schedule["decay_start_field"] == "decay_start_tokens"
    assert schedule["warmup_steps"] == 2000
    assert (schedule["decay"], schedule["final_fraction"]) == (("cosine", 0.1) if name == "large" else ("linear", 0.0))

    # The step the decay starts at, from a walk of every step: the first whose lr is below the peak.
    before = walk_steps(spec)
    first = bisect.bisect_right(before, DECAY_START[name])
    assert schedule["decay_start_step"] == first and schedule["total_steps"] == len(before)

    def factor(step: int) -> float:
        return pretrain_lr_factor(step, before[step], spec.optim.schedule, spec.data.pretrain_tokens)

    assert factor(first - 1) == 1.0 and factor(first) < 1.0  # the peak up to the step before, decayed from it on
    phase = next(p for p in schedule["phases"] if p["first_step"] <= first < p["first_step"] + p["steps"])
    assert schedule["decay_start_phase"] == phase["name"]

    # Days: GPU-hours over the layout's GPUs, per node and summed.
    gpus = spec.parallel.nodes * spec.parallel.gpus_per_node
    costed = [n for n in plan["nodes"] if "gpu_hours" in n]
    for node in costed:
        assert node["days"] == pytest.approx(node["gpu_hours"] / gpus / 24)
    est = plan["estimates"]
    assert est["graph_days"] == pytest.approx(sum(n["days"] for n in costed))
    pretrain = [n for n in costed if n["kind"] == "pretrain"]
    assert est["pretrain_days"] == pytest.approx(sum(n["days"] for n in pretrain))
    if name == "large":
        assert abs(est["pretrain_days"] / PUBLISHED_LARGE_DAYS - 1) <= 0.15, est["pretrain_days"]


def test_plan_table_shows_loaders_decay_start_and_days() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trinity.cli", "plan", "graphs/trinity-large.yaml"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    text = out.stdout  # as a user's terminal shows it (a fresh process, 200 columns)
    assert "rsdb, buffer 4,096, 4 workers" in text and text.count("sequential, 1 worker") == 2
    assert "after 10.00T of 17.00T tokens" in text and "(phase1)" in text
    assert "days of wall time (pretraining)" in text and "33.0 on 2,048 GPUs" in text
