"""YAML with positions: parse safely, remember the file and line of every value, compose pieces.

A mapping may hold `use: PATH` (or a list of paths), relative to the file it is written in: the
referenced spec pieces are loaded and deep-merged in order, then the mapping's own keys override
them. Lists are replaced, not merged. Only `yaml.SafeLoader` ever constructs values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trinity.errors import SpecError

Path_ = tuple[str | int, ...]
USE_KEY = "use"


@dataclass(frozen=True)
class Location:
    """Where a value was written: a file and a 1-based line (or a command-line override)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line > 0 else self.file


@dataclass
class Located:
    """A plain data tree (dicts, lists, scalars) and the location of every path in it."""

    data: Any
    locations: dict[Path_, Location] = field(default_factory=dict)

    def location_of(self, path: Path_) -> Location | None:
        """The location of `path`, or of its longest prefix that has one."""
        for end in range(len(path), -1, -1):
            loc = self.locations.get(tuple(path[:end]))
            if loc is not None:
                return loc
        return None


def display_path(path: Path) -> str:
    """A path as the user should read it: relative to the working directory when possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_yaml(path: Path, _stack: tuple[Path, ...] = ()) -> Located:
    """Load `path` with its `use:` pieces resolved, recording each value's location."""
    path = path.resolve()
    shown = display_path(path)
    if path in _stack:
        chain = " -> ".join(display_path(p) for p in (*_stack, path))
        raise SpecError([f"{shown}: `use:` cycle: {chain}"])
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise SpecError([f"{Location(shown, line)}: invalid YAML: {exc.problem or exc}"]) from None
    if node is None:
        return Located({}, {(): Location(shown, 1)})
    located = Located(None)
    located.data = _convert(node, (), shown, located.locations)
    return _resolve_uses(located, path, (*_stack, path))


def _convert(node: yaml.Node, path: Path_, shown: str, locations: dict[Path_, Location]) -> Any:
    locations[path] = Location(shown, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader("").construct_object(key_node)
            where = Location(shown, key_node.start_mark.line + 1)
            if not isinstance(key, str):
                raise SpecError([f"{where}: mapping keys must be strings, got {key!r}"])
            if key in out:
                raise SpecError([f"{where}: duplicate key {key!r} (first set at line {locations[(*path, key)].line})"])
            out[key] = _convert(value_node, (*path, key), shown, locations)
            locations[(*path, key)] = where
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), shown, locations) for i, item in enumerate(node.value)]
    return yaml.SafeLoader("").construct_object(node)


def _resolve_uses(located: Located, path: Path, stack: tuple[Path, ...]) -> Located:
    """Replace every mapping's `use:` by the merged pieces it names, in place of that mapping."""

    def walk(value: Any, at: Path_) -> Any:
        if isinstance(value, list):
            return [walk(item, (*at, i)) for i, item in enumerate(value)]
        if not isinstance(value, dict):
            return value
        own = {k: walk(v, (*at, k)) for k, v in value.items() if k != USE_KEY}
        if USE_KEY not in value:
            return own
        refs = value[USE_KEY] if isinstance(value[USE_KEY], list) else [value[USE_KEY]]
        merged: dict[str, Any] = {}
        for i, ref in enumerate(refs):
            where = located.locations.get((*at, USE_KEY, i) if isinstance(value[USE_KEY], list) else (*at, USE_KEY))
            if not isinstance(ref, str):
                raise SpecError([f"{where}: `use:` takes a relative path or a list of them, got {ref!r}"])
            target = path.parent / ref
            if not target.is_file():
                raise SpecError([f"{where}: `use: {ref}`: no such file ({display_path(target)})"])
            piece = load_yaml(target, stack)
            if not isinstance(piece.data, dict):
                raise SpecError([f"{where}: `use: {ref}` must hold a mapping"])
            for sub, loc in piece.locations.items():
                if sub:
                    located.locations.setdefault((*at, *sub), loc)
            merged = deep_merge(merged, piece.data)
        located.locations.pop((*at, USE_KEY), None)
        return deep_merge(merged, own)

    # The file's own locations are recorded first, so they win over the pieces' (setdefault);
    # a piece's locations under a value the file replaced are dropped.
    located.data = walk(located.data, ())
    located.locations = {p: loc for p, loc in located.locations.items() if path_exists(located.data, p)}
    return located


def path_exists(data: Any, path: Path_) -> bool:
    """Whether `path` names a value inside `data`."""
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return False
    return True


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
