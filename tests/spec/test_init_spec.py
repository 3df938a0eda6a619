"""`init:` of a training stage (trinity.spec.init): exactly one source, each field where it belongs,
errors located at the file and line that wrote them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import compose
from trinity.errors import SpecError
from trinity.spec.init import InitSpec
from trinity.spec.loading import load_experiment

PHASES = [
    {"name": "phase1", "tokens": 30000, "seq_len": 64, "mix": {"docs": 1.0}},
    {"name": "decay", "tokens": 4000, "seq_len": 64, "mix": {"docs": 1.0}},
]


def with_init(tmp_path: Path, init: dict[str, object]) -> Path:
    phases = [PHASES[0], {**PHASES[1], "init": init}]
    return compose(tmp_path / "g.yaml", "micro.yaml", data={"phases": phases})


def test_from_parses_node_and_step() -> None:
    init = InitSpec.model_validate({"from": "pretrain/stable@2000"})
    assert (init.from_node, init.from_step, init.optimizer) == ("pretrain/stable", 2000, False)
    assert InitSpec.model_validate({"from": "sft"}).from_step is None
    assert InitSpec.model_validate({"from": "pretrain/stable", "step": 40}).step == 40


@pytest.mark.parametrize(
    ("init", "field", "message"),
    [
        ({"from": "pretrain/phase1", "hf": "x"}, "hf", "must be the only source"),
        ({}, "init", "got none"),
        ({"from": "pretrain/phase1@x"}, "from", "must be NODE or NODE@STEP"),
        ({"run": "runs/a"}, "node", "is required with `run`"),
        ({"hf": "x", "node": "sft"}, "node", "is only allowed with `run`"),
        ({"from": "pretrain/phase1@20", "step": 20}, "step", "is given twice"),
        ({"hf": "x", "optimizer": True}, "optimizer", "only allowed for trinity sources"),
        ({"from": "pretrain/phase1", "frm": 1}, "frm", "unknown field"),
    ],
)
def test_invalid_init_names_the_field_and_line(
    tmp_path: Path, init: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(SpecError) as exc:
        load_experiment(with_init(tmp_path, init))
    text = str(exc.value)
    assert "g.yaml:" in text and "data.phases.1.init" in text and message in text, text
    assert field == "init" or f"init.{field}" in text, text


def test_every_training_stage_takes_init(tmp_path: Path) -> None:
    stages = {
        "extend": {
            "tokens": 2000,
            "seq_len": 128,
            "target_len": 128,
            "global_batch_sequences": 8,
            "mix": {"docs": 1.0},
            "init": {"from": "pretrain/phase1"},
        },
        "sft": {"tokens": 2000, "seq_len": 128, "global_batch_sequences": 8, "init": {"hf": "hf-dir"}},
        "rl": {"steps": 2, "init": {"run": "runs/a", "node": "sft", "step": 4}},
    }
    spec = load_experiment(compose(tmp_path / "g.yaml", "micro.yaml", stages=stages)).spec
    assert spec.stages.extend is not None and spec.stages.extend.init is not None
    assert spec.stages.sft is not None and spec.stages.sft.init == InitSpec.model_validate({"hf": "hf-dir"})
    assert spec.stages.rl is not None and spec.stages.rl.init is not None and spec.stages.rl.init.step == 4
