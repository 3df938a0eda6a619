"""User-given names (trinity/spec/names.py): every name that becomes a node id, a folder or a label
is one plain path segment, checked where the spec is read, with an error naming the field, its
file:line (or --set) and what is allowed; node ids are checked as relative paths under RUN/nodes.

The property a name must have is checked independently of the pattern: joined to a folder, it is
exactly one new path component (os.path.normpath neither removes nor climbs anything).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cli_runs import trinity
from tests.conftest import ROOT, SMALL_GRAPH, mutate
from trinity.errors import SpecError
from trinity.spec.loading import load_experiment
from trinity.spec.names import NAME_MAX_LENGTH, NAME_RULE, is_name, node_id_problem

TINY = ROOT / "graphs" / "tiny.yaml"

BAD_NAMES = [
    "../../../victim",
    "..",
    ".",
    "a/b",
    "/abs",
    "",
    "-rf",
    ".hidden",
    "a b",
    "a\nb",
    "name\n",
    "a\x00b",
    'q"uote',
    "a<b>",
    "x]y",
    "[x]",
    "e@v",
    "a\\b",
    "caf\u00e9",
    "x" * (NAME_MAX_LENGTH + 1),
]
GOOD_NAMES = ["phase1", "Phase-2", "0", "web_hq", "v1.2", "a..b", "x" * NAME_MAX_LENGTH]


def one_segment(name: str) -> bool:
    """Independent of the pattern: `name` under a folder is exactly one new path component."""
    base = "/run/nodes"
    joined = os.path.normpath(os.path.join(base, name))
    return os.path.dirname(joined) == base and os.path.basename(joined) == name and "\x00" not in name


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused(name: str) -> None:
    assert not is_name(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_accepted_and_are_one_path_segment(name: str) -> None:
    assert is_name(name) and one_segment(name)


@settings(max_examples=300, derandomize=True)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80) | st.from_regex(r"[A-Za-z0-9_./\\-]{0,70}"))
def test_every_accepted_name_is_one_plain_segment(text: str) -> None:
    if is_name(text):
        assert one_segment(text) and text.isascii() and text.isprintable() and len(text) <= NAME_MAX_LENGTH
        assert node_id_problem(text) is None and node_id_problem(f"eval/{text}@pretrain") is None


# (field as --set names it, the dotted path the error must name)
NAME_FIELDS = [
    ("name", "name"),
    ("data.phases.0.name", "data.phases.0.name"),
    ("stages.evals.0.name", "stages.evals.0.name"),
    ("stages.evals.1.name", "stages.evals.1.name"),
]


@pytest.mark.parametrize(("field", "dotted"), NAME_FIELDS)
@pytest.mark.parametrize("value", ["../../../victim", "a/b", "x y"])
def test_every_name_field_refuses_a_path_naming_field_and_rule(field: str, dotted: str, value: str) -> None:
    with pytest.raises(SpecError) as info:
        load_experiment(TINY, [f"{field}={value}"])
    line = next(line for line in info.value.lines if dotted in line)
    assert line.startswith(f"--set #1 ({field}={value}): {dotted} = {value!r}")
    assert NAME_RULE in line


def test_a_source_name_is_checked_where_the_file_sets_it(small_graph: Path) -> None:
    text, line = mutate(SMALL_GRAPH, "code: {kind: demo", "../code: {kind: demo, corpus: stdlib_code}")
    small_graph.write_text(text.replace("mix: {code: 1.0", "mix: {../code: 1.0"))
    with pytest.raises(SpecError) as info:
        load_experiment(small_graph)
    located = [entry for entry in info.value.lines if entry.startswith(f"{small_graph}:{line}:")]
    assert located and "data.sources.../code" in located[0] and NAME_RULE in located[0]


def test_names_that_differ_only_in_case_are_refused() -> None:
    # nodes/pretrain/Phase1 and nodes/pretrain/phase1 are one folder on macOS and Windows.
    with pytest.raises(SpecError) as info:
        load_experiment(TINY, ["data.phases.1.name=PHASE1"])
    assert any("data.phases.1.name = 'PHASE1' is used twice (as 'phase1'" in line for line in info.value.lines)
    with pytest.raises(SpecError) as info:
        load_experiment(TINY, ["stages.evals.1.name=Heldout"])
    assert any("stages.evals.1.name = 'Heldout' is used twice" in line for line in info.value.lines)


def test_every_name_in_the_repository_graphs_is_a_name() -> None:
    graphs = sorted((ROOT / "graphs").glob("**/*.yaml")) + sorted((ROOT / "tests" / "graphs").glob("*.yaml"))
    assert len(graphs) >= 5
    for path in graphs:
        spec = load_experiment(path).spec
        names = [spec.name, *spec.data.sources, *(p.name for p in spec.data.phases)]
        names += [e.name for e in spec.stages.evals]
        assert all(is_name(n) and one_segment(n) for n in names), (path, names)


@pytest.mark.parametrize(
    ("node_id", "problem"),
    [
        ("../../victim", "'..' segment"),
        ("eval/../../x", "'..' segment"),
        ("pretrain/./x", "'.' segment"),
        ("/etc/x", "absolute path"),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("", "is empty"),
        ("a\x00b", "control character"),
        ("a\nb", "control character"),
        ("a\x1b[2Jb", "control character"),
        ("a\\..\\b", "backslash"),
        ("x" * 300, "longer than 255 bytes"),
    ],
)
def test_node_id_problems(node_id: str, problem: str) -> None:
    found = node_id_problem(node_id)
    assert found is not None and problem in found


@pytest.mark.parametrize(
    "node_id",
    ["tokenizer", "pretrain/phase1", "eval/heldout@pretrain:phase1", "pretrain/main[main.loader=rsdb~13f2ba3533]"],
)
def test_node_ids_as_compiled_have_no_problem(node_id: str) -> None:
    assert node_id_problem(node_id) is None


def test_validate_refuses_a_traversing_eval_name_with_exit_2_and_a_location() -> None:
    # The finding: this name made every node folder of the eval land outside the run directory.
    result = trinity("validate", str(TINY), "--set", "stages.evals.0.name=../../../victim")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--set #1 (stages.evals.0.name=../../../victim): stages.evals.0.name" in result.stderr
    assert "letters, digits" in result.stderr and "Traceback" not in result.stderr
