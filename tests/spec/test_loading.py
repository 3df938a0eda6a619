"""YAML composition, overrides and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, SMALL_GRAPH
from trinity.errors import SpecError
from trinity.spec.loading import load_experiment


def test_use_composes_pieces_and_own_keys_override(tmp_path: Path) -> None:
    (tmp_path / "pieces").mkdir()
    (tmp_path / "pieces" / "moe.yaml").write_text("n_experts: 16\ntop_k: 4\nexpert_hidden: 32\n")
    (tmp_path / "pieces" / "model.yaml").write_text(
        "vocab_size: 512\nd_model: 64\nn_layers: 4\nn_heads: 4\nn_kv_heads: 2\nhead_dim: 16\n"
        "dense_hidden: 128\nsliding_window: 64\nmoe: {use: moe.yaml, top_k: 2}\n"
    )
    text = SMALL_GRAPH.replace(
        SMALL_GRAPH[SMALL_GRAPH.index("model:") : SMALL_GRAPH.index("tokenizer:")],
        "model: {use: pieces/model.yaml, n_layers: 8}\n",
    )
    path = tmp_path / "g.yaml"
    path.write_text(text)
    spec = load_experiment(path).spec
    assert spec.model.n_layers == 8  # own key wins
    assert spec.model.moe.n_experts == 16  # from the nested piece
    assert spec.model.moe.top_k == 2  # the piece's own override of its piece


def test_error_in_a_piece_points_at_the_piece(tmp_path: Path) -> None:
    (tmp_path / "model.yaml").write_text(
        "vocab_size: 512\nd_model: 64\nn_layers: 4\nn_heads: 4\nn_kv_heads: 2\nhead_dim: 16\n"
        "dense_hidden: 128\nsliding_window: 64\nmoe: {n_experts: 4, top_k: 6}\n"
    )
    text = SMALL_GRAPH.replace(
        SMALL_GRAPH[SMALL_GRAPH.index("model:") : SMALL_GRAPH.index("tokenizer:")],
        "model: {use: model.yaml}\n",
    )
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(SpecError) as exc:
        load_experiment(tmp_path / "g.yaml")
    assert any("model.yaml:9: model.moe.top_k = 6 must be <= n_experts (4)" in line for line in exc.value.lines)


def test_use_cycle_and_missing_piece_are_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("use: b.yaml\n")
    (tmp_path / "b.yaml").write_text("use: a.yaml\n")
    with pytest.raises(SpecError, match="cycle"):
        load_experiment(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("name: x\nmodel: {use: nowhere.yaml}\n")
    with pytest.raises(SpecError, match=r"c\.yaml:2: `use: nowhere.yaml`: no such file"):
        load_experiment(tmp_path / "c.yaml")


def test_duplicate_keys_and_bad_yaml_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("name: x\nseed: 1\nseed: 2\n")
    with pytest.raises(SpecError, match=r"d\.yaml:3: duplicate key 'seed' \(first set at line 2\)"):
        load_experiment(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("name: x\nmodel: [1, 2\nseed: 1\n")
    with pytest.raises(SpecError, match=r"e\.yaml:\d+: invalid YAML"):
        load_experiment(tmp_path / "e.yaml")


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError):
        load_experiment(tmp_path / "f.yaml")


def test_set_overrides_typed_by_the_models(small_graph: Path) -> None:
    spec = load_experiment(
        small_graph,
        [
            "optim.muon.lr=2e-3",
            "data.phases.phase1.tokens=5000",
            "stability.balancing={kind: smebu, lambda: 1.0e-3}",
        ],
    ).spec
    assert spec.optim.muon.lr == pytest.approx(2e-3)  # "2e-3" is a YAML string; the model types it
    assert spec.data.phases[0].tokens == 5000
    assert spec.stability.balancing.kind == "smebu"
    with pytest.raises(SpecError, match="no list item named 'phase9'"):
        load_experiment(small_graph, ["data.phases.phase9.tokens=1"])
    with pytest.raises(SpecError, match=r"expected FIELD\.PATH=VALUE"):
        load_experiment(small_graph, ["optim.muon.lr"])


@pytest.mark.parametrize("name", ["tiny", "trinity-nano", "trinity-mini", "trinity-large"])
def test_presets_load(name: str) -> None:
    spec = load_experiment(ROOT / "graphs" / f"{name}.yaml").spec
    assert spec.name == name
    assert len(spec.data.phases) == 3
