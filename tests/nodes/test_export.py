"""Export nodes `export/NAME@STAGE` and `trinity export`: compiled after the stage they convert, and end to end
on a short micro run: the directory transformers loads gives trinity's logits (checked here, not by the node)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import compose
from trinity.cli import app
from trinity.errors import NodeFailure, SpecError
from trinity.graph.compile import compile_graph
from trinity.model import TrinityModel
from trinity.nodes.upstream import load_final_model
from trinity.run.graph import RunGraph
from trinity.run.layout import RunDir, read_json
from trinity.run.status import NodeStatus
from trinity.spec.loading import load_experiment

SHORT = {
    "phases": [
        {
            "name": "phase1",
            "tokens": 4096,
            "seq_len": 64,
            "mix": {"docs": 2.0, "math": 1.0},
            "loader": {"kind": "sequential"},
        }
    ]
}
EXPORTS = [
    {"after": "pretrain"},
    {"after": "pretrain:phase1", "name": "bf16", "dtype": "bfloat16", "shard_bytes": 200_000},
]


def trinity(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "trinity.cli", *args], capture_output=True, text=True, timeout=900)


def exports_graph(path: Path, exports: list[dict[str, object]], **stages: object) -> Path:
    return compose(path, "micro.yaml", data=SHORT, stages={"exports": exports, **stages})


# -- compiling -------------------------------------------------------------------------------------


def test_export_nodes_follow_their_stage_and_the_tokenizer(tmp_path: Path) -> None:
    graph = compile_graph(load_experiment(exports_graph(tmp_path / "g.yaml", EXPORTS)))
    hf, bf16 = graph.nodes["export/hf@pretrain"]["node"], graph.nodes["export/bf16@pretrain:phase1"]["node"]
    assert hf.kind == bf16.kind == "export" and hf.deps == bf16.deps == ("pretrain/phase1", "tokenizer")
    assert hf.identity != bf16.identity  # same stage, another dtype
    again = compile_graph(load_experiment(exports_graph(tmp_path / "h.yaml", [{**EXPORTS[0], "check_atol": 1e-3}])))
    assert again.nodes["export/hf@pretrain"]["node"].identity != hf.identity
    assert again.nodes["pretrain/phase1"]["node"].identity == graph.nodes["pretrain/phase1"]["node"].identity


def test_unknown_stage_and_duplicate_exports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"stages.exports.0.after.*'sft'.*allowed: pretrain, pretrain:phase1"):
        load_experiment(exports_graph(tmp_path / "a.yaml", [{"after": "sft"}]))
    with pytest.raises(SpecError, match=r"stages.exports.1.name.*export/hf@pretrain.*another `name`"):
        load_experiment(exports_graph(tmp_path / "b.yaml", [{"after": "pretrain"}, {"after": "pretrain"}]))
    with pytest.raises(SpecError, match=r"stages.exports.0.dtype"):
        load_experiment(exports_graph(tmp_path / "c.yaml", [{"after": "pretrain", "dtype": "float16"}]))


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of tokenizer -> prepare -> pretrain (8 steps, a checkpoint every 4) -> both exports."""
    root = tmp_path_factory.mktemp("export")
    graph = exports_graph(root / "g.yaml", EXPORTS)
    run = root / "run"
    result = trinity("run", str(graph), "--run-dir", str(run), "--set", "execution.checkpoint.every=4")
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def _their_logits_match(run: Path, node: str, hf_dir: Path, dtype: torch.dtype) -> None:
    """transformers' model of `hf_dir` against trinity's of `node`'s final checkpoint (rounded to `dtype`)."""
    from transformers import AfmoeForCausalLM

    graph = RunGraph.load(RunDir(run))
    model, _ = load_final_model(RunDir(run).node(node), graph.spec(graph[node]).model)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(t.to(dtype))
    theirs = AfmoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(
        0, model.spec.vocab_size, (3, 2 * model.spec.sliding_window + 5), generator=torch.Generator().manual_seed(7)
    )
    with torch.no_grad():
        assert (model(ids).logits - theirs(ids).logits).abs().max().item() < 1e-4


@pytest.mark.slow
def test_export_nodes_succeed_and_load_in_transformers(exported: Path) -> None:
    from transformers import AutoTokenizer

    from trinity.data.tokenizer import load_tokenizer

    run = RunDir(exported)
    for node_id, dtype, sharded in (
        ("export/hf@pretrain", torch.float32, False),
        ("export/bf16@pretrain:phase1", torch.bfloat16, True),
    ):
        node = run.node(node_id)
        assert NodeStatus.read(node).state == "SUCCEEDED"
        result = read_json(node.outputs / "export.json")
        assert result["stage_node"] == "pretrain/phase1" and result["step"] == 8
        assert 0 <= result["check"]["max_abs_diff"] <= 1e-4 and result["check"]["sequences"] == 4
        hf_dir = node.outputs / "hf"
        assert (hf_dir / "model.safetensors.index.json").is_file() == sharded
        assert len(list(hf_dir.glob("*.safetensors"))) == result["shards"] and (result["shards"] > 1) == sharded
        _their_logits_match(exported, "pretrain/phase1", hf_dir, dtype)
    tok = load_tokenizer(run.node("tokenizer").outputs)
    hf_tok = AutoTokenizer.from_pretrained(run.node("export/hf@pretrain").outputs / "hf")
    text = "The sum of 1234567 and 89 is 1234656. <|doc|>"
    assert hf_tok(text)["input_ids"] == tok.encode(text)


@pytest.mark.slow
def test_export_command_from_a_committed_step(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", str(exported), "pretrain/phase1", str(out), "--step", "4"])
    assert result.exit_code == 0, result.output
    assert "step 4" in result.output and (out / "model.safetensors").is_file()
    from transformers import AfmoeForCausalLM

    from trinity.store.checkpoint import load_checkpoint

    graph = RunGraph.load(RunDir(exported))
    model = TrinityModel(graph.spec(graph["pretrain/phase1"]).model).eval()
    step4 = RunDir(exported).node("pretrain/phase1").checkpoints / "step-00000004"
    model.load_state_dict(load_checkpoint(step4)["model"])
    theirs = AfmoeForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids).logits - theirs(ids).logits).abs().max().item() < 1e-4
    final = CliRunner().invoke(
        app, ["export", str(exported), "pretrain/phase1", str(tmp_path / "f"), "--dtype", "bfloat16"]
    )
    assert final.exit_code == 0 and "step 8" in final.output, final.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "OUT"], r"'nope' is not a node of this run \(training nodes: pretrain/phase1\)"),
        (["tokenizer", "OUT"], r"tokenizer is a tokenizer node; export a training node \(pretrain/phase1\)"),
        (["pretrain/phase1", "OUT", "--step", "3"], r"no committed checkpoint at step 3 \(committed steps: 4, 8\)"),
        (["pretrain/phase1", "FULL"], r"FULL exists and is not an empty folder"),
        (["pretrain/phase1", "OUT", "--dtype", "float16"], r"--dtype 'float16' is not float32 or bfloat16"),
    ],
)
def test_export_command_errors(exported: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "mine.txt").write_text("keep")
    args = [str(tmp_path / a) if a in ("OUT", "FULL") else a for a in args]
    result = CliRunner().invoke(app, ["export", str(exported), *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "OUT").exists() and [p.name for p in (tmp_path / "FULL").iterdir()] == ["mine.txt"]


@pytest.mark.slow
def test_a_wrong_export_fails_the_node_and_leaves_no_export(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapping bug (the final norm's weights off by 1%: loads fine, shapes right) fails the node's body,
    and what an earlier attempt exported is gone, so verification cannot pass either."""
    from trinity.interop import hf as hf_interop
    from trinity.nodes.context import NodeContext
    from trinity.nodes.export import run_export_node, verify_export_node

    run_dir = tmp_path / "run"
    shutil.copytree(exported, run_dir)
    graph = RunGraph.load(RunDir(run_dir))
    node = graph["export/hf@pretrain"]
    ctx = NodeContext(graph=graph, node=node, spec=graph.spec(node), base_dir=tmp_path, attempt=2, run_id="test")
    verify_export_node(ctx)  # the copied attempt's export is there and verifies
    right = hf_interop.to_hf_state_dict

    def off(model: TrinityModel) -> dict[str, torch.Tensor]:
        sd = right(model)
        sd["model.norm.weight"] = sd["model.norm.weight"] * 1.01
        return sd

    monkeypatch.setattr(hf_interop, "to_hf_state_dict", off)
    with pytest.raises(NodeFailure, match=r"max \|logit difference\| .* > 0.0001"):
        run_export_node(ctx)
    assert not (ctx.dir.outputs / "hf").exists() and not list(ctx.dir.outputs.glob(".hf.partial-*"))
    with pytest.raises(NodeFailure, match=r"export\.json was not written"):
        verify_export_node(ctx)
