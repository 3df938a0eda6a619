"""Load an experiment graph: YAML pieces, `--set` overrides, validation, and errors with file:line.

    spec, source = load_experiment(Path("graphs/tiny.yaml"), ["optim.muon.lr=2e-3"])

Every problem becomes one line `file:line: dotted.path message`, raised together as SpecError.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trinity.errors import SpecError
from trinity.spec.experiment import ExperimentSpec
from trinity.spec.rules import RuleViolations
from trinity.spec.schema_walk import allowed_fields, model_at
from trinity.spec.yaml_source import MAX_DEPTH, Located, Location, Path_, display_path, load_text, load_yaml, short_repr


@dataclass(frozen=True)
class LoadedSpec:
    """A validated experiment and the located data it came from."""

    spec: ExperimentSpec
    source: Located
    path: Path
    base: Path | None = None
    """Where relative data paths start, when not the graph file's folder (a resumed run's)."""

    @property
    def base_dir(self) -> Path:
        """Relative data paths in the spec are relative to the graph file's folder."""
        return self.base if self.base is not None else self.path.resolve().parent


def load_experiment(path: Path, sets: list[str] | tuple[str, ...] = (), base: Path | None = None) -> LoadedSpec:
    """Load, override and validate the graph file at `path` (relative data paths start at `base` if given)."""
    located = load_yaml(path)
    if not isinstance(located.data, dict):
        raise SpecError([f"{display_path(path)}:1: a graph file must be a mapping of sections"])
    for i, assignment in enumerate(sets):
        shown = assignment if len(assignment) <= 80 else assignment[:79] + "…"
        apply_set(located, assignment, Location(f"{SET_PREFIX}{i + 1} ({shown})", 0))
    return LoadedSpec(validate(located, user_file=display_path(path)), located, path, base)


SET_PREFIX = "--set #"
"""How a `--set` override's location starts (`--set #2 (parallel.micro_batch=2)`)."""


def parse_assignment(assignment: str, where: str = "--set") -> tuple[str, Any]:
    """Split `a.b.c=VALUE`; VALUE is read as a YAML scalar or flow collection (typed later by the model),
    or is the text as written when it is not valid YAML. Its nesting counts from the field's depth."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise SpecError([f"--set {short_repr(assignment, 100)}: expected FIELD.PATH=VALUE, e.g. optim.muon.lr=2e-3"])
    key = key.strip()
    if not raw.strip():
        return key, ""
    try:
        return key, load_text(raw, where, key.count(".") + 1).data
    except yaml.YAMLError:
        return key, raw


def apply_set(located: Located, assignment: str, where: Location) -> None:
    """Apply one `--set a.b.c=VALUE` to the located data, recording `where` as its location (and as
    the location of every section it creates, so an error about a new section is blamed on it)."""
    key, value = parse_assignment(assignment, str(where))
    path = set_path(located.data, key, value, str(where))
    for sub in [p for p in located.locations if p[: len(path)] == path and len(p) > len(path)]:
        del located.locations[sub]
    located.locations[path] = where
    for end in range(1, len(path)):
        located.locations.setdefault(path[:end], where)


def set_path(data: dict[str, Any], dotted: str, value: Any, where: str) -> Path_:
    """Set `dotted` (list items by index or by `name`) to `value`; returns the resolved path."""
    parts = dotted.split(".")
    if len(parts) > MAX_DEPTH:
        raise SpecError([f"{where}: a field path of {len(parts)} parts; values nest at most {MAX_DEPTH} levels"])
    resolved: list[str | int] = []
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        key: str | int = part
        if isinstance(node, list):
            key = _list_index(node, part, ".".join(parts[: depth + 1]), where, item_names(node, tuple(resolved), data))
        elif not isinstance(node, dict):
            shown = ".".join(map(str, resolved))
            raise SpecError([f"{where}: {shown} is a value, not a section; cannot set {dotted}"])
        resolved.append(key)
        if last:
            node[key] = copy.deepcopy(value)
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
    return tuple(resolved)


INDEX = re.compile(r"-?[0-9]{1,18}")
"""A list item given by its index (ASCII digits only: `int` refuses other digits, and long ones)."""


def item_names(items: list[Any], path: Path_, data: Any) -> list[str | None]:
    """The name each item of the list at `path` goes by: its `name` as written, else the name its model
    gives it (an eval's default name, `mk_niah`; an export's label, `hf`), else None.

    An item that does not write `name` still has one: it is in its node ids (`eval/mk_niah@extend`),
    so `--set stages.evals.mk_niah.samples=2` must find it as the README promises."""
    names: list[str | None] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            names.append(None)
        elif isinstance(item.get("name"), str):
            names.append(item["name"])
        else:
            names.append(_default_name(model_at(ExperimentSpec, (*path, i), data), item))
    return names


def _default_name(model: type[BaseModel] | None, item: dict[str, Any]) -> str | None:
    """The name a model gives an item without `name`: its `label` if it has one (exports), else the
    default of its `name` field; None when the item does not validate or has no name field."""
    if model is None or "name" not in model.model_fields:
        return None
    try:
        value = model.model_validate(item)
    except ValidationError:
        default = model.model_fields["name"].default
        return default if isinstance(default, str) else None
    name = getattr(value, "label", getattr(value, "name", None))
    return name if isinstance(name, str) else None


def _list_index(items: list[Any], part: str, shown: str, where: str, names: list[str | None]) -> int:
    if INDEX.fullmatch(part):
        index = int(part)
        if not 0 <= index < len(items):
            raise SpecError([f"{where}: {shown}: index {index} out of range (0..{len(items) - 1})"])
        return index
    if part in names:
        return names.index(part)
    listed = ", ".join(n for n in names if n is not None) or "none; give an index"
    raise SpecError([f"{where}: {shown}: no list item named {part!r} (names: {listed})"])


def validate(located: Located, model: type[BaseModel] = ExperimentSpec, user_file: str | None = None) -> Any:
    """Validate the data against `model`; every problem becomes one located line in a SpecError.
    `user_file`: the graph file as the user named it (display_path), whose lines a rule that spans
    fields blames before a `use:` piece's (see _blame)."""
    try:
        return model.model_validate(located.data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, located, model, user_file)) from None


def format_validation_error(
    exc: ValidationError, located: Located, model: type[BaseModel], user_file: str | None = None
) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        loc = _user_path(err["loc"], located.data)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, RuleViolations):
            for v in cause.violations:
                full = (*loc, *v.path)
                if v.related:
                    lines.append(_spanning(located, full, [(*loc, *r) for r in v.related], v.message, user_file))
                else:
                    lines.append(f"{_where(located, full)}: {_dotted(full)} {v.message}")
            continue
        lines.append(f"{_where(located, loc)}: {_dotted(loc)}{_describe(err, loc, located.data, model)}")
    return list(dict.fromkeys(lines))


def _describe(err: Any, loc: Path_, data: Any, model: type[BaseModel]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = allowed_fields(model, loc[:-1], data)
        return f": unknown field; allowed: {', '.join(allowed)}" if allowed else ": unknown field"
    if kind == "missing":
        return ": required field is missing"
    shown = err.get("input")
    prefix = f" = {short_repr(shown, 200)}" if not isinstance(shown, dict | list) else ""
    return f"{prefix}: {err['msg']}"


def _user_path(loc: tuple[Any, ...], data: Any) -> Path_:
    """Pydantic's error location without the segments it adds (union tags, validator names)."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif i == len(loc) - 1 and isinstance(part, str) and isinstance(node, dict) and node.get("kind") != part:
            out.append(part)  # a missing field: name it
    return tuple(out)


def _spanning(located: Located, path: Path_, related: list[Path_], message: str, user_file: str | None) -> str:
    """The line of a rule that spans fields (a batch the layout must divide): located at the line the
    user wrote among them (_blame), followed by where each of them was set.

    A preset's batch is right for the preset's layout; when `--set parallel.nodes=128` breaks it, the
    line to show is that `--set`, not the preset's batch line the user never touched."""
    written = [p for p in related if p in located.locations]  # a default written nowhere blames nothing
    where = _blame(located, [path, *written], user_file)
    sources = "; ".join(f"{_dotted(p)} at {_where(located, p)}" for p in [path, *written])
    return f"{where}: {_dotted(path)} {message} (set at: {sources})"


def _blame(located: Located, paths: list[Path_], user_file: str | None) -> Location | str:
    """The location among `paths`' that the user wrote most directly: a `--set`, else a line of the graph
    file itself (`user_file`), else a `use:` piece's; the first of equals (the rule's own field first)."""

    def rank(path: Path_) -> int:
        where = located.location_of(path)
        if where is None:
            return -1
        if where.line == 0 and where.file.startswith(SET_PREFIX):
            return 2
        return 1 if where.file == user_file else 0

    return _where(located, max(paths, key=rank))  # max keeps the first of equal ranks


def _where(located: Located, path: Path_) -> Location | str:
    return located.location_of(path) or "<spec>"


def _dotted(path: Path_) -> str:
    return ".".join(map(str, path)) if path else "(top level)"
