"""Reading spec files safely: bounded size, depth and expansion, `use:` confined to the project, and
every bad file refused with its file and line (never a traceback, a hang or a file's secret text)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from trinity.errors import SpecError
from trinity.spec import yaml_source
from trinity.spec.yaml_source import MAX_DEPTH, MAX_FILE_BYTES, MAX_USE_LOADS, MAX_VALUES, load_text, load_yaml

SECRET = "TOPSECRET42"


def refused(path: Path) -> list[str]:
    with pytest.raises(SpecError) as exc:
        load_yaml(path)
    return exc.value.lines


def test_an_alias_bomb_is_refused_at_the_alias_that_crosses_the_limit(tmp_path: Path) -> None:
    """The 'billion laughs' of the finding: 9 anchors, each a list of 9 aliases of the one before."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    # Line k holds a list whose expansion has (9**(k+1) - 1) / 8 values; with the top-level mapping,
    # the values counted after line k are 1 + sum of those. The limit is crossed on the first line
    # that takes the sum past MAX_VALUES.
    total, line = 1, 0
    while total <= MAX_VALUES:
        line += 1
        total += (9 ** (line + 1) - 1) // 8
    assert refused(tmp_path / "bomb.yaml") == [
        f"{tmp_path / 'bomb.yaml'}:{line}: the graph expands to more than {MAX_VALUES:,} values"
        " (this alias repeats its anchor's values)"
    ]


def test_use_fan_out_is_bounded_by_the_number_of_loads(tmp_path: Path) -> None:
    """Each piece uses the one below it ten times: 10**5 loads unbounded, refused after MAX_USE_LOADS."""
    (tmp_path / "p0.yaml").write_text("x: 1\n")
    for level in range(1, 6):
        (tmp_path / f"p{level}.yaml").write_text(f"use: [{', '.join([f'p{level - 1}.yaml'] * 10)}]\n")
    lines = refused(tmp_path / "p5.yaml")
    assert len(lines) == 1 and lines[0].endswith(f": more than {MAX_USE_LOADS} `use:` loads in one graph")


def test_use_nesting_is_bounded(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"n{i}.yaml").write_text(f"use: n{i + 1}.yaml\n")
    (tmp_path / "n40.yaml").write_text("x: 1\n")
    lines = refused(tmp_path / "n0.yaml")
    # n0 is the graph, n1..n16 the pieces nested within limits; n16's own `use:` would be one deeper
    depth = yaml_source.MAX_USE_DEPTH
    assert lines == [f"{tmp_path / f'n{depth}.yaml'}:1: `use:` nested more than {depth} files deep"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: x\nmodel: " + "[" * 5000 + "]" * 5000 + "\n", 2),  # the finding: a RecursionError
        # the top mapping is level 1; the mapping of level L starts on line L + 1
        ("name: x\n" + "".join(" " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)), MAX_DEPTH + 2),
        ("a:\n" + "- " * (MAX_DEPTH + 1) + "x\n", 2),
    ],
    ids=["flow", "block-mapping", "block-sequence"],
)
def test_deep_nesting_is_refused_with_its_line(tmp_path: Path, text: str, line: int) -> None:
    (tmp_path / "deep.yaml").write_text(text)
    assert refused(tmp_path / "deep.yaml") == [
        f"{tmp_path / 'deep.yaml'}:{line}: values nest more than {MAX_DEPTH} levels deep"
    ]


def test_aliases_cannot_nest_deeper_than_the_limit(tmp_path: Path) -> None:
    half = MAX_DEPTH // 2 + 1
    (tmp_path / "a.yaml").write_text(f"a: &a {'[' * half}1{']' * half}\nb: {'[' * half}*a{']' * half}\n")
    assert refused(tmp_path / "a.yaml") == [f"{tmp_path / 'a.yaml'}:2: values nest more than {MAX_DEPTH} levels deep"]


def test_an_alias_never_contains_its_own_anchor(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: x\nloop: &a [1, *a]\n")
    assert refused(tmp_path / "r.yaml") == [
        f"{tmp_path / 'r.yaml'}:2: an alias (`*`) to no complete anchor (`&`) before it"
    ]


def test_a_graph_file_is_a_regular_file_of_bounded_size(tmp_path: Path) -> None:
    assert refused(Path("/dev/zero")) == ["/dev/zero: not a regular file (a spec is a YAML file)"]
    os.mkfifo(tmp_path / "fifo.yaml")  # opening it would block until a writer comes
    assert refused(tmp_path / "fifo.yaml") == [f"{tmp_path / 'fifo.yaml'}: not a regular file (a spec is a YAML file)"]
    (tmp_path / "big.yaml").write_text("#" * (MAX_FILE_BYTES + 1))
    assert refused(tmp_path / "big.yaml") == [
        f"{tmp_path / 'big.yaml'}: {MAX_FILE_BYTES + 1:,} bytes; a spec file holds at most {MAX_FILE_BYTES:,}"
    ]


def test_a_file_with_too_many_values_is_refused_while_parsing(tmp_path: Path) -> None:
    (tmp_path / "many.yaml").write_text("name: x\nlist:\n" + "- 0\n" * (MAX_VALUES + 10))
    lines = refused(tmp_path / "many.yaml")
    # a collection counts when it closes: `name`, `x`, `list`, then one per item from line 3 on
    assert lines == [f"{tmp_path / 'many.yaml'}:{MAX_VALUES}: more than {MAX_VALUES:,} values in one file"]


def test_invalid_utf8_and_control_characters_are_located(tmp_path: Path) -> None:
    data = b"name: x\nseed: 1\ndescription: caf\xe9\n"  # Latin-1, not UTF-8
    (tmp_path / "bytes.yaml").write_bytes(data)
    assert refused(tmp_path / "bytes.yaml") == [
        f"{tmp_path / 'bytes.yaml'}:3: not UTF-8 text (invalid continuation byte at byte offset {data.index(0xE9)})"
    ]
    (tmp_path / "bell.yaml").write_text("name: x\nseed: 1\ndescription: \u00e9\x07\n")
    lines = refused(tmp_path / "bell.yaml")
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'bell.yaml'}:3: invalid YAML: character U+0007")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "base: &b {lr: 1}\nother:\n  <<: *b\n",
            "3: YAML merge keys (`<<`) are not supported; compose pieces with `use:`",
        ),
        ("name: x\nseed: !!int abc\n", "2: not a valid YAML int (an explicit !!int or a malformed value)"),
        ("name: x\nwhen: 2024-13-45\n", "2: not a valid YAML timestamp (an explicit !!timestamp or a malformed value)"),
        ("name: x\nseed: !!bool maybe\n", "2: not a valid YAML bool (an explicit !!bool or a malformed value)"),
        (
            "name: !!python/object/apply:os.system ['echo pwned']\n",
            "1: unsupported YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'",
        ),
        ("name: x\n---\nname: y\n", "2: a second YAML document; a spec file holds one"),
        ("? [a, b]\n: 1\n", "1: mapping keys must be strings, got a collection"),
    ],
    ids=["merge-key", "bad-int", "bad-date", "bad-bool", "python-tag", "two-documents", "list-key"],
)
def test_yaml_that_pyyaml_would_crash_on_is_a_located_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "y.yaml").write_text(text)
    assert refused(tmp_path / "y.yaml") == [f"{tmp_path / 'y.yaml'}:{message}"]


def test_numbers_with_an_exponent_are_floats() -> None:
    """YAML 1.1 reads `1e-3` as a string; strict float fields need it as the number it is."""
    data = load_text("{a: 1e-3, b: 5E+4, c: -2e5, d: 1.5e3, e: 1_000, f: e5, g: 1e, h: '1e-3'}", "t").data
    assert data == {"a": 0.001, "b": 50000.0, "c": -200000.0, "d": 1500.0, "e": 1000, "f": "e5", "g": "1e", "h": "1e-3"}
    assert [type(v) for v in data.values()] == [float, float, float, float, int, str, str, str]


# -- `use:` stays inside the project ---------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp/project (a repository: it holds pyproject.toml) with a graph, and tmp/outside with a secret."""
    monkeypatch.delenv(yaml_source.SPEC_ROOT_ENV, raising=False)
    (tmp_path / "project" / "specs").mkdir(parents=True)
    (tmp_path / "project" / "pyproject.toml").write_text("")
    (tmp_path / "project" / "specs" / "piece.yaml").write_text("d_model: 64\n")
    (tmp_path / "outside").mkdir()
    # Not YAML a spec could use: an alias to an unknown anchor (PyYAML's message would name it).
    (tmp_path / "outside" / "secret.yaml").write_text(f"password: *{SECRET}\n")
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "project"


def use(project: Path, ref: str, folder: str = "graphs") -> Path:
    (project / folder).mkdir(exist_ok=True)
    path = project / folder / "g.yaml"
    path.write_text(f"name: g\nmodel: {{use: '{ref}'}}\n")
    return path


@pytest.mark.parametrize("ref", ["../../outside/secret.yaml", "ABSOLUTE", "../specs/link.yaml"])
def test_use_outside_the_project_is_refused_before_reading(project: Path, ref: str) -> None:
    secret = project.parent / "outside" / "secret.yaml"
    (project / "specs" / "link.yaml").symlink_to(secret)
    lines = refused(use(project, str(secret) if ref == "ABSOLUTE" else ref))
    assert len(lines) == 1
    assert lines[0].startswith("graphs/g.yaml:2: `use: ")
    assert f"` resolves outside the project ({secret}); pieces must lie under {project} (or a folder" in lines[0]
    assert SECRET not in lines[0]


def test_use_inside_the_project_works_relative_or_absolute(project: Path) -> None:
    for ref in ("../specs/piece.yaml", str(project / "specs" / "piece.yaml")):
        assert load_yaml(use(project, ref)).data["model"] == {"d_model": 64}
    # a graph in a sub-folder of the repository uses pieces anywhere in it
    assert load_yaml(use(project, "../../specs/piece.yaml", "graphs/deeper")).data["model"] == {"d_model": 64}


def test_a_configured_spec_root_is_allowed_and_bad_yaml_there_is_not_echoed(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(yaml_source.SPEC_ROOT_ENV, str(project.parent / "outside"))
    lines = refused(use(project, "../../outside/secret.yaml"))
    assert lines == [
        f"{project.parent / 'outside' / 'secret.yaml'}:1: an alias (`*`) to no complete anchor (`&`) before it"
    ]
    (project.parent / "outside" / "secret.yaml").write_text(f"a: b\n  c: {SECRET}\n")
    lines = refused(use(project, "../../outside/secret.yaml"))
    assert len(lines) == 1 and "secret.yaml:2: invalid YAML" in lines[0] and SECRET not in lines[0]


def test_yaml_problems_lose_quoted_file_content() -> None:
    assert yaml_source._without_content("found undefined alias 'hunter2'") == "found undefined alias '…'"
    assert yaml_source._without_content("expected ',' or ']', but got '<scalar>'") == (
        "expected ',' or ']', but got '<scalar>'"
    )


def test_dump_yaml_round_trips_strings_that_look_like_numbers() -> None:
    """`1e5` is a string to yaml.safe_dump (YAML 1.1) but a float here: a run's spec.yaml must quote it."""
    data = {"name": "1e5", "lr": 1e-3, "weird": "-2E+4", "plain": "1.5", "n": 5, "text": "é [red]x"}
    assert load_text(yaml_source.dump_yaml(data), "t").data == data
    assert load_text(yaml.safe_dump(data), "t").data["name"] == 100000.0  # why dump_yaml exists
