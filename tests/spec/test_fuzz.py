"""Fuzzing the front door: every graph file and every `--set` ends in exit 0, or in exit 2 with each
error line located (`file:line:` or `--set #N`), never exit 1, a traceback or a hang.

Inputs: random YAML documents (mappings, lists, scalars, anchors and aliases, deep nesting, alias
bombs, `use:`), mutations of a real graph file (a field replaced or deleted, a key added, characters
inserted into its text), random bytes; and `--set` assignments to paths of the spec models (and to
random paths) with random scalars, strings holding rich markup, unicode and YAML syntax.

Seeded (derandomize) so CI sees the same examples every run. TRINITY_FUZZ_EXAMPLES sets how many
per test (CI: 150 each, 300 in all; a longer local run: TRINITY_FUZZ_EXAMPLES=10000).
"""

from __future__ import annotations

import os
import re
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner, Result

from tests.conftest import SMALL_GRAPH
from trinity.cli import app
from trinity.spec.experiment import ExperimentSpec

EXAMPLES = int(os.environ.get("TRINITY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=timedelta(seconds=30),  # far above the ~50 ms an example takes: only a runaway input fails it
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
LOCATED = re.compile(r"error: (\S+\.yaml:\d+: |--set )")
"""An error line that says where: the graph file (or a piece) and a line, or the --set it comes from."""

runner = CliRunner()
BASE: dict[str, Any] = yaml.safe_load(SMALL_GRAPH)

MARKUP = ["[/bold]x", "[red]x[/red]", "[bold", "]", "[link=file:///etc]x[/link]", ":fire:", "\\[x]", "[/]"]
UNICODE = ["é", "ß", "\u202e", "\u00a0", "😀", "\u2028", "\ufeff", "٣", "²", "\x00", "\x07", "\t"]
YAML_TEXT = ["1e400", "-.inf", ".nan", "0x1F", "0o17", "1_000", "2024-13-45", "~", "=", "<<", "!!int x"]
YAML_TEXT += ["*a", "&a [*a]", "[1, 2", "{a: 1", "'", '"', "- x", "a: b", "? x", "|", ">", "%YAML 1.1", "---"]


def field_paths(model: type[BaseModel], prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted paths of the spec models' fields (list items as index 0, unions through each member)."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        out.append(path)
        if depth < 5:
            for sub in _models_in(info.annotation):
                out += field_paths(sub, f"{path}.", depth + 1)
                if _is_sequence(info.annotation):
                    out += field_paths(sub, f"{path}.0.", depth + 1)
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (tuple, list) or any(_is_sequence(a) for a in typing.get_args(annotation))


PATHS = sorted(set(field_paths(ExperimentSpec)))
FIELDS = sorted({p.rsplit(".", 1)[-1] for p in PATHS})

# -- values ------------------------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=24),
    st.sampled_from(MARKUP + UNICODE + YAML_TEXT),
    st.lists(st.sampled_from(MARKUP + UNICODE + YAML_TEXT + ["x", " ", "1"]), max_size=5).map("".join),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**40, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | texts, inner, max_size=4),
    max_leaves=12,
)


def dump(data: Any, flow: bool | None, unicode: bool) -> str:
    return yaml.safe_dump(data, default_flow_style=flow, allow_unicode=unicode, sort_keys=False, width=10**6)


# -- documents ---------------------------------------------------------------------------------------


def all_paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            out += all_paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += all_paths(value, (*prefix, i))
    return out


BASE_PATHS = all_paths(BASE)[1:]


@st.composite
def mutated_graph(draw: st.DrawFn) -> bytes:
    """The small graph with a few fields replaced, deleted or added, then maybe its text damaged."""
    data = yaml.safe_load(SMALL_GRAPH)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(BASE_PATHS))
        parent: Any = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            how = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if how == "replace":
                parent[path[-1]] = draw(values)
            elif how == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(FIELDS) | texts)] = draw(values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced this path
    text = dump(data, draw(st.sampled_from([None, False, True])), draw(st.booleans()))
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        text = (
            text[:at] + draw(st.sampled_from(YAML_TEXT + MARKUP + UNICODE + ["\n", "  ", ":", "#"])) + text[at + cut :]
        )
    return text.encode("utf-8", "surrogatepass")


@st.composite
def alias_bomb(draw: st.DrawFn) -> bytes:
    width, levels = draw(st.integers(2, 12)), draw(st.integers(1, 9))
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return ("name: bomb\n" + "\n".join(lines) + "\n").encode()


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 400))
    style = draw(st.sampled_from(["flow", "map", "seq", "alias"]))
    if style == "flow":
        body = "[" * n + "]" * n
    elif style == "map":
        return ("name: x\nmodel:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(n))).encode()
    elif style == "seq":
        body = "\n" + "- " * n + "x"
    else:
        half = n // 2
        return f"a: &a {'[' * half}1{']' * half}\nb: {'[' * half}*a{']' * half}\n".encode()
    return f"name: x\nmodel: {body}\n".encode()


@st.composite
def with_use(draw: st.DrawFn) -> bytes:
    ref = draw(st.sampled_from(["g.yaml", "./g.yaml", "../g.yaml", "/etc/passwd", ".", "", "piece.yaml", "/dev/zero"]))
    ref = draw(st.sampled_from([ref, ref, draw(texts)]))
    section = draw(st.sampled_from(["model", "data", "optim", "stages"]))
    return dump({**BASE, section: {"use": draw(st.sampled_from([ref, [ref, ref], 5, None]))}}, None, True).encode()


documents = st.one_of(
    mutated_graph(),
    mutated_graph(),
    st.builds(dump, values, st.sampled_from([None, False, True]), st.booleans()).map(lambda t: t.encode("utf-8")),
    alias_bomb(),
    deep(),
    with_use(),
    st.binary(max_size=200),
    st.just(SMALL_GRAPH.encode()),
)

# -- --set -------------------------------------------------------------------------------------------

set_paths = st.one_of(
    st.sampled_from(PATHS),
    st.sampled_from(PATHS).map(lambda p: p.replace(".0.", ".phase1.")),
    st.lists(
        st.sampled_from([*FIELDS[:20], "0", "-1", "99", "phase1", "", "²", "[red]", "x"]), min_size=1, max_size=5
    ).map(".".join),
    texts,
)
set_values = st.one_of(
    texts,
    scalars.map(lambda v: dump(v, True, True).removesuffix("\n...\n").strip()),
    values.map(lambda v: dump(v, True, True).strip()),
)
sets = st.lists(st.builds(lambda p, v: f"{p}={v}", set_paths, set_values) | texts, max_size=3)


def check(result: Result) -> None:
    output = result.stdout + result.stderr
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {output[-2000:]}"
    assert "Traceback" not in output
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and all(LOCATED.match(line) for line in lines), result.stderr[-2000:]


@FUZZ
@given(document=documents, assignments=sets, command=st.sampled_from(["validate", "validate", "validate", "plan"]))
def test_every_input_exits_0_or_2_with_a_location(
    tmp_path: Path, document: bytes, assignments: list[str], command: str
) -> None:
    graph = tmp_path / "g.yaml"
    graph.write_bytes(document)
    (tmp_path / "piece.yaml").write_text("d_model: 64\n")
    args = [command, str(graph)]
    for assignment in assignments:
        args += ["--set", assignment]
    check(runner.invoke(app, args))


@FUZZ
@given(assignments=st.lists(st.builds(lambda p, v: f"{p}={v}", set_paths, set_values), min_size=1, max_size=3))
def test_every_set_on_a_valid_graph_exits_0_or_2_with_a_location(tmp_path: Path, assignments: list[str]) -> None:
    graph = tmp_path / "g.yaml"
    graph.write_text(SMALL_GRAPH)
    args = ["validate", str(graph)]
    for assignment in assignments:
        args += ["--set", assignment]
    check(runner.invoke(app, args))
