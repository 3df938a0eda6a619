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
from trinity.spec.schema_walk import allowed_fields
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
        apply_set(located, assignment, Location(f"--set #{i + 1} ({shown})", 0))
    return LoadedSpec(validate(located), located, path, base)


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
            key = _list_index(node, part, ".".join(parts[: depth + 1]), where)
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


def _list_index(items: list[Any], part: str, shown: str, where: str) -> int:
    if INDEX.fullmatch(part):
        index = int(part)
        if not 0 <= index < len(items):
            raise SpecError([f"{where}: {shown}: index {index} out of range (0..{len(items) - 1})"])
        return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise SpecError([f"{where}: {shown}: no list item named {part!r} (names: {', '.join(map(str, names))})"])


def validate(located: Located, model: type[BaseModel] = ExperimentSpec) -> Any:
    """Validate the data against `model`; every problem becomes one located line in a SpecError."""
    try:
        return model.model_validate(located.data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, located, model)) from None


def format_validation_error(exc: ValidationError, located: Located, model: type[BaseModel]) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        loc = _user_path(err["loc"], located.data)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, RuleViolations):
            for v in cause.violations:
                full = (*loc, *v.path)
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


def _where(located: Located, path: Path_) -> Location | str:
    return located.location_of(path) or "<spec>"


def _dotted(path: Path_) -> str:
    return ".".join(map(str, path)) if path else "(top level)"
