"""YAML composition, overrides and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, SMALL_GRAPH, mutate
from trinity.errors import SpecError
from trinity.spec.loading import load_experiment
from trinity.spec.yaml_source import MAX_DEPTH, MAX_VALUES


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
    with pytest.raises(SpecError) as exc:  # blamed on the `use:` that closes the cycle
        load_experiment(tmp_path / "a.yaml")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert exc.value.lines == [f"{b}:1: `use:` cycle: {a} -> {b} -> {a}"]
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


def set_errors(small_graph: Path, *sets: str) -> list[str]:
    with pytest.raises(SpecError) as exc:
        load_experiment(small_graph, list(sets))
    return exc.value.lines


def test_set_errors_are_blamed_on_the_set_even_in_sections_it_creates(small_graph: Path) -> None:
    """The finding: an unknown field in a section the --set created was blamed on a line of the file."""
    (line,) = set_errors(small_graph, "nonsense.x=1")
    assert line.startswith("--set #1 (nonsense.x=1): nonsense: unknown field; allowed: data, description,")
    (line,) = set_errors(small_graph, "seed=1", "model.moe.nonsense.deep=1")
    assert line.startswith("--set #2 (model.moe.nonsense.deep=1): model.moe.nonsense: unknown field; allowed:")
    assert set_errors(small_graph, "data.phases.phase1=5") == [
        "--set #1 (data.phases.phase1=5): data.phases.0 = 5: "
        "Input should be a valid dictionary or instance of PhaseSpec"
    ]
    assert set_errors(small_graph, "model.d_model=true") == [
        "--set #1 (model.d_model=true): model.d_model = True: Input should be a valid integer"
    ]


def test_set_values_are_bounded_like_files(small_graph: Path) -> None:
    deep = "[" * 5000 + "]" * 5000  # was a RecursionError
    shown = f"description={deep}"[:79] + "…"  # a long --set is cut in messages
    assert set_errors(small_graph, f"description={deep}") == [
        f"--set #1 ({shown}): values nest more than {MAX_DEPTH} levels deep"
    ]
    bomb = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b],"
    bomb += " &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
    (line,) = set_errors(small_graph, f"description={bomb}")
    assert line.endswith(f"expands to more than {MAX_VALUES:,} values (this alias repeats its anchor's values)")
    path = ".".join(["a"] * (MAX_DEPTH + 1))
    assert set_errors(small_graph, f"{path}=1") == [
        f"--set #1 ({path[:79]}…): a field path of {MAX_DEPTH + 1} parts; values nest at most {MAX_DEPTH} levels"
    ]
    # unicode digits are names, not indices (int() takes some of them, and refuses superscripts)
    assert set_errors(small_graph, "data.phases.\u00b2=1") == [
        "--set #1 (data.phases.\u00b2=1): data.phases.\u00b2: no list item named '\u00b2' (names: phase1)"
    ]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("d_model: 64", "d_model: true", "model.d_model = True: Input should be a valid integer"),
        ("d_model: 64", "d_model: '64'", "model.d_model = '64': Input should be a valid integer"),
        ("d_model: 64", "d_model: 64.5", "model.d_model = 64.5: Input should be a valid integer"),
        (
            "mix: {code: 1.0, docs: 1.0}",
            "mix: {code: .inf, docs: 1.0}",
            "mix.code = inf: Input should be a finite number",
        ),
        (
            "mix: {code: 1.0, docs: 1.0}",
            "mix: {code: .nan, docs: 1.0}",
            "mix.code = nan: Input should be a finite number",
        ),
        (
            "mix: {code: 1.0, docs: 1.0}",
            "mix: {code: inf, docs: 1.0}",
            "mix.code = 'inf': Input should be a valid number",
        ),
        (
            "mix: {code: 1.0, docs: 1.0}",
            "mix: {code: '1', docs: 1.0}",
            "mix.code = '1': Input should be a valid number",
        ),
        (
            "mix: {code: 1.0, docs: 1.0}",
            "mix: {code: true, docs: 1.0}",
            "mix.code = True: Input should be a valid number",
        ),
        ("global_every: 4", "qk_norm: 1", "model.qk_norm = 1: Input should be a valid boolean"),
    ],
)
def test_numbers_and_bools_are_strict(tmp_path: Path, old: str, new: str, message: str) -> None:
    text, line = mutate(SMALL_GRAPH, old, new)
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(SpecError) as exc:
        load_experiment(tmp_path / "g.yaml")
    assert [text for text in exc.value.lines if message in text] == [
        f"{tmp_path / 'g.yaml'}:{line}: {'data.phases.0.' if 'mix' in message else ''}{message}"
    ]


def test_numbers_keep_their_natural_spellings(tmp_path: Path) -> None:
    """An int field takes an integral float (`1e5`), a float field an int; bools and strings stay refused."""
    text, _ = mutate(SMALL_GRAPH, "tokens: 100000", "tokens: 1e5")
    text, _ = mutate(text, "d_model: 64", "d_model: 64.0")
    text, _ = mutate(text, "mix: {code: 1.0, docs: 1.0}", "mix: {code: 1, docs: 3}")
    (tmp_path / "g.yaml").write_text(text)
    spec = load_experiment(tmp_path / "g.yaml").spec
    phase = spec.data.phases[0]
    assert (phase.tokens, type(phase.tokens)) == (100000, int)
    assert (spec.model.d_model, type(spec.model.d_model)) == (64, int)
    assert phase.mix == {"code": 1.0, "docs": 3.0} and all(type(v) is float for v in phase.mix.values())
