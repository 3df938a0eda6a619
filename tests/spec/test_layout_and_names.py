"""The guide's layout and `--set` examples as a user types them: a layout that cannot split a preset's
global batch is blamed on the user's own line (a `--set`, the graph file), not on the preset's batch line;
list items go by the name they carry in node ids even when the file does not write `name:`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT, compose
from trinity.cli import app
from trinity.errors import SpecError
from trinity.spec.loading import load_experiment
from trinity.spec.stages import NiahEval

runner = CliRunner()
NANO, TINY = ROOT / "graphs" / "trinity-nano.yaml", ROOT / "graphs" / "tiny.yaml"


def test_more_gpus_than_nanos_batches_allow_is_blamed_on_the_set_line() -> None:
    """Nano's extension batch (128 sequences at cp 4) fills 512 GPUs at micro_batch 1: 1024 GPUs x micro_batch 2
    cannot split it. The error starts at the user's `--set`, and says where the batch itself was written."""
    sets = ["--set", "parallel.nodes=128", "--set", "parallel.micro_batch=2"]
    result = runner.invoke(app, ["plan", str(NANO), *sets])
    assert result.exit_code == 2
    extend = next(line for line in result.stderr.splitlines() if "stages.extend.global_batch_sequences" in line)
    assert extend.startswith("error: --set #1 (parallel.nodes=128): stages.extend.global_batch_sequences = 128 ")
    assert "(256 x 2 = 512; world 1024 / cp 4)" in extend
    assert "stages.extend.global_batch_sequences at specs/stages/nano.yaml:7" in extend
    assert "parallel.micro_batch at --set #2 (parallel.micro_batch=2)" in extend
    assert all(line.startswith("error: --set #") for line in result.stderr.splitlines())
    fits = runner.invoke(app, ["plan", str(NANO), "--json", "--set", "parallel.nodes=32", *sets[2:]])  # the guide's
    assert fits.exit_code == 0, fits.stderr
    assert json.loads(fits.stdout)["estimates"]["world_size"] == 256


def test_a_layout_in_the_graph_file_is_blamed_before_the_pieces_it_uses(tmp_path: Path) -> None:
    graph = compose(tmp_path / "three.yaml", "micro.yaml", parallel={"gpus_per_node": 3})  # line 3
    with pytest.raises(SpecError) as info:
        load_experiment(graph)
    streams = next(line for line in info.value.lines if "data.streams" in line)
    assert streams.startswith(f"{graph}:3: data.streams = 4 must be a multiple of the data-parallel ranks")
    assert "data.streams at specs/data/micro.yaml:7" in streams
    with pytest.raises(SpecError) as typed:  # the batch typed on the command line: that is the line to blame
        load_experiment(graph, ["optim.batch.0.sequences=7"])
    batch = next(line for line in typed.value.lines if "optim.batch" in line)
    assert batch.startswith("--set #1 (optim.batch.0.sequences=7): optim.batch.0.sequences = 7 must be divisible")


def test_set_addresses_list_items_by_their_default_names() -> None:
    """tiny.yaml's evals write no `name:`; each has its kind's default (`mk_niah`), as in `eval/mk_niah@extend`.
    By name or by index, the same item changes; an export goes by its label (`hf`, its format)."""
    by_name = load_experiment(TINY, ["stages.evals.mk_niah.samples=2"]).spec
    by_index = load_experiment(TINY, ["stages.evals.1.samples=2"]).spec
    niah = by_name.stages.evals[1]
    assert by_name == by_index and isinstance(niah, NiahEval) and niah.samples == 2
    exported = load_experiment(TINY, ["stages.exports=[{after: sft}]", "stages.exports.hf.dtype=bfloat16"]).spec
    assert exported.stages.exports[0].dtype == "bfloat16"
    typed = runner.invoke(app, ["validate", str(TINY), "--set", "stages.evals.mk_niah.samples=2"])  # the README's
    assert typed.exit_code == 0, typed.stderr
    result = runner.invoke(app, ["validate", str(TINY), "--set", "stages.evals.nope.samples=2"])
    assert result.exit_code == 2
    assert "no list item named 'nope' (names: heldout, mk_niah, arithmetic)" in result.stderr
