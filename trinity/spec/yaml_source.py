"""YAML with positions: parse safely, remember the file and line of every value, compose pieces.

A mapping may hold `use: PATH` (or a list of paths), relative to the file it is written in: the
referenced spec pieces are loaded and deep-merged in order, then the mapping's own keys override
them. Lists are replaced, not merged. Only `yaml.SafeLoader`'s constructors ever make values.

`use:` is confined to the project. A piece must resolve (symlinks followed first) inside one of
the spec roots:
- the repository of the top-level graph file: its nearest ancestor folder holding `.git` or
  `pyproject.toml`, else the graph file's own folder;
- the repository of the working directory, when it is inside one (the project trinity runs in);
- every folder listed in the environment variable `TRINITY_SPEC_ROOT` (separated by `os.pathsep`),
  for spec pieces shared between projects.
An absolute `use:` path is allowed when it resolves inside a root; anything else is refused before
the file is opened, so a graph file cannot make trinity read (and print) a file outside them.

Input is bounded, so that no file makes loading slow or unbounded (a graph file is a few KiB):
- a spec file is a regular file (never a device or a FIFO) of at most MAX_FILE_BYTES, in UTF-8;
- values nest at most MAX_DEPTH levels (a piece counts from where it is used, a `--set` value
  from the depth of its field);
- one graph expands to at most MAX_VALUES values, counting each value every time an alias or a
  `use:` repeats it (so an alias bomb is refused at the alias that crosses the limit);
- one graph loads at most MAX_USE_LOADS pieces, nested at most MAX_USE_DEPTH deep.

Reading follows YAML 1.1 (PyYAML's safe types), with two changes: a number with an exponent but no
dot (`1e-3`) is a float, as in YAML 1.2, not a string; and merge keys (`<<: *base`) are refused,
since `use:` is how pieces compose. An alias may only refer to an anchor whose value is complete,
so no value contains itself. A file that is not valid YAML is reported by line and kind of problem,
never with its text (it may be a file that is not a spec at all).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import yaml.constructor
import yaml.resolver

from trinity.errors import SpecError

Path_ = tuple[str | int, ...]
USE_KEY = "use"
SPEC_ROOT_ENV = "TRINITY_SPEC_ROOT"
PROJECT_MARKERS = (".git", "pyproject.toml")

MAX_FILE_BYTES = 1 << 20
"""1 MiB: pure-Python YAML parses about 60 KiB/s on a busy CI core, libyaml about 1 MiB/s."""
MAX_DEPTH = 100
MAX_VALUES = 100_000
"""A graph file has a few hundred values; a sweep or a mix of many sources, a few thousand."""
MAX_USE_LOADS = 1000
MAX_USE_DEPTH = 16

_PARSER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BYTE_POSITIONS = _PARSER is not yaml.SafeLoader
"""libyaml reports a ReaderError's position in bytes of the UTF-8 text, PyYAML in characters."""

_TAG = "tag:yaml.org,2002:"
MAP_TAG, SEQ_TAG, MERGE_TAG = _TAG + "map", _TAG + "seq", _TAG + "merge"
_SCALAR_TAGS = {_TAG + t for t in ("null", "bool", "int", "float", "str", "timestamp", "binary")}


class _Resolver(yaml.resolver.Resolver):
    """PyYAML's YAML 1.1 implicit types, plus YAML 1.2 floats written without a dot (`1e-3`, `5E+4`)."""


EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
"""A YAML 1.2 float that YAML 1.1 reads as a string: an exponent and no dot (`1e-3`)."""
_Resolver.add_implicit_resolver(_TAG + "float", EXPONENT_FLOAT, list("-+0123456789"))


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string this module would read back as a number (`'1e5'`)."""


_Dumper.add_implicit_resolver(_TAG + "float", EXPONENT_FLOAT, list("-+0123456789"))


def dump_yaml(data: Any) -> str:
    """YAML text that `load_yaml` reads back as `data` (yaml.safe_dump would leave `1e5` unquoted,
    a string to YAML 1.1 but a float here)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


class _AliasScalar(yaml.ScalarNode):
    """A use of an anchored value (`*name`): the anchor's content, the alias's own mark."""


class _AliasSequence(yaml.SequenceNode):
    """A use of an anchored sequence: the anchor's items (shared, not copied), the alias's mark."""


class _AliasMapping(yaml.MappingNode):
    """A use of an anchored mapping: the anchor's pairs (shared, not copied), the alias's mark."""


_ALIAS_OF: dict[type[yaml.Node], type[yaml.Node]] = {
    yaml.ScalarNode: _AliasScalar,
    yaml.SequenceNode: _AliasSequence,
    yaml.MappingNode: _AliasMapping,
}
_ALIASES = (_AliasScalar, _AliasSequence, _AliasMapping)


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
    except (ValueError, OSError, RuntimeError):
        return str(path)


def spec_roots(graph: Path) -> tuple[Path, ...]:
    """The folders whose files `use:` may read, for the top-level graph file `graph` (see above)."""
    folder = graph.resolve().parent
    roots = [_project_of(folder) or folder]
    here = _project_of(Path.cwd().resolve())
    if here is not None:
        roots.append(here)
    for entry in os.environ.get(SPEC_ROOT_ENV, "").split(os.pathsep):
        if entry.strip():
            roots.append(Path(entry.strip()).expanduser().resolve())
    return tuple(dict.fromkeys(roots))


def _project_of(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if any((candidate / marker).exists() for marker in PROJECT_MARKERS):
            return candidate
    return None


def load_yaml(path: Path) -> Located:
    """Load the graph file `path` with its `use:` pieces resolved, recording each value's location."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise SpecError([f"{path}: cannot read: {exc}"]) from None
    return _Composition(spec_roots(resolved)).load(resolved, (), 0)


def load_text(text: str, shown: str, depth: int = 0) -> Located:
    """Read one YAML value from `text` (no `use:`); nested values count from `depth`. A syntax
    error raises yaml.YAMLError, a value beyond the limits SpecError (both located at `shown`)."""
    if len(text) > MAX_FILE_BYTES:
        raise SpecError([f"{shown}: longer than {MAX_FILE_BYTES:,} characters"])
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8 on the command line
        raise SpecError([f"{shown}: not UTF-8 text (at character {exc.start})"]) from None
    located = Located(None)
    node = _compose(text, shown, depth, numbered=False)
    if node is not None:
        located.data = _Converter(shown, located.locations, _Budget(), numbered=False).convert(node, (), depth)
    return located


def read_spec_text(path: Path, shown: str) -> str:
    """The text of a spec file: a regular file of at most MAX_FILE_BYTES, in UTF-8."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SpecError([f"{shown}: not a regular file (a spec is a YAML file)"])
        if info.st_size > MAX_FILE_BYTES:
            raise SpecError([f"{shown}: {info.st_size:,} bytes; a spec file holds at most {MAX_FILE_BYTES:,}"])
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # the file may grow after stat
    except OSError as exc:
        raise SpecError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError([f"{shown}: more than {MAX_FILE_BYTES:,} bytes; a spec file holds at most that"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecError([f"{shown}:{line}: not UTF-8 text ({exc.reason} at byte offset {exc.start})"]) from None


@dataclass
class _Budget:
    """What one graph may still spend: values (counted each time they are placed) and piece loads."""

    values: int = MAX_VALUES
    loads: int = MAX_USE_LOADS


@dataclass
class _Composition:
    """The state of loading one graph file and its pieces."""

    roots: tuple[Path, ...]
    budget: _Budget = field(default_factory=_Budget)
    parsed: dict[Path, yaml.Node | None] = field(default_factory=dict)

    def load(self, path: Path, stack: tuple[Path, ...], depth: int) -> Located:
        """`path` (resolved) with its pieces; `stack` is the chain of files using it, `depth` where it is used."""
        shown = display_path(path)
        if path not in self.parsed:
            self.parsed[path] = _parse_file(path, shown, depth)
        node = self.parsed[path]
        if node is None:
            return Located({}, {(): Location(shown, 1)})
        located = Located(None)
        located.data = _Converter(shown, located.locations, self.budget).convert(node, (), depth)
        return self._resolve_uses(located, path, (*stack, path), depth)

    def _resolve_uses(self, located: Located, path: Path, stack: tuple[Path, ...], depth: int) -> Located:
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
                key: Path_ = (*at, USE_KEY, i) if isinstance(value[USE_KEY], list) else (*at, USE_KEY)
                where = located.locations.get(key) or Location(display_path(path), 0)
                piece = self._piece(ref, path, where, stack, depth + len(at))
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

    def _piece(self, ref: Any, path: Path, where: Location, stack: tuple[Path, ...], depth: int) -> Located:
        """The piece `use: ref` names in the file `path`, loaded (checked against roots and budgets)."""
        if not isinstance(ref, str) or not ref.strip():
            raise SpecError([f"{where}: `use:` takes a relative path or a list of them, got {short_repr(ref)}"])
        name = ref if len(ref) <= 80 else ref[:79] + "…"
        if len(stack) > MAX_USE_DEPTH:
            raise SpecError([f"{where}: `use:` nested more than {MAX_USE_DEPTH} files deep"])
        self.budget.loads -= 1
        if self.budget.loads < 0:
            raise SpecError([f"{where}: more than {MAX_USE_LOADS} `use:` loads in one graph"])
        try:
            target = (path.parent / ref).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL in the path
            raise SpecError([f"{where}: `use: {name}`: cannot resolve the path ({exc})"]) from None
        if not any(target.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(map(str, self.roots))
            raise SpecError(
                [
                    f"{where}: `use: {name}` resolves outside the project ({target}); pieces must "
                    f"lie under {allowed} (or a folder listed in {SPEC_ROOT_ENV})"
                ]
            )
        if not target.is_file():
            raise SpecError([f"{where}: `use: {name}`: no such file ({display_path(target)})"])
        if target in stack:
            chain = " -> ".join(display_path(p) for p in (*stack, target))
            raise SpecError([f"{where}: `use:` cycle: {chain}"])
        piece = self.load(target, stack, depth)
        if not isinstance(piece.data, dict):
            raise SpecError([f"{where}: `use: {name}` must hold a mapping"])
        self.budget.values -= len(piece.locations)  # placing a piece copies its locations
        if self.budget.values < 0:
            raise SpecError([f"{where}: the graph expands to more than {MAX_VALUES:,} values"])
        return piece


def _parse_file(path: Path, shown: str, depth: int) -> yaml.Node | None:
    text = read_spec_text(path, shown)
    try:
        return _compose(text, shown, depth)
    except yaml.YAMLError as exc:
        raise SpecError([yaml_problem(exc, shown, text)]) from None


def yaml_problem(exc: yaml.YAMLError, shown: str, text: str) -> str:
    """A parse error as `file:line: invalid YAML: problem`, without the text it was found in."""
    if isinstance(exc, yaml.reader.ReaderError):
        if _BYTE_POSITIONS:
            line = text.encode("utf-8", "surrogatepass")[: exc.position].count(b"\n") + 1
        else:
            line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        return f"{shown}:{line}: invalid YAML: character U+{char:04X} is not allowed ({exc.reason})"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        return f"{Location(shown, line)}: invalid YAML: {_without_content(exc.problem or exc.context or 'syntax')}"
    return f"{shown}: invalid YAML: {type(exc).__name__}"


def _without_content(problem: str) -> str:
    """PyYAML's problem text with quoted file content elided: token names and single characters stay."""

    def keep(m: re.Match[str]) -> str:
        inner = m.group(1)
        return m.group(0) if len(inner) <= 2 or re.fullmatch(r"<[\w ]+>", inner) else "'…'"

    return re.sub(r"'([^'\n]*)'", keep, problem)


def _compose(text: str, shown: str, depth: int, numbered: bool = True) -> yaml.Node | None:
    """The single document in `text` as a node tree, built from parser events without recursion.

    Collections nest at most MAX_DEPTH - `depth` levels (the parser is lazy, so a deeper file stops
    here at the first level too deep). An anchor is registered once its value is complete, and an
    alias becomes a node that shares its anchor's content and carries the alias's own mark.
    Errors name the line, unless not `numbered` (a value given on the command line).
    """
    resolver: Any = _Resolver()  # PyYAML's stubs leave `resolve` untyped
    anchors: dict[str, yaml.Node] = {}
    open_: list[tuple[yaml.Node, list[yaml.Node], str | None]] = []
    root: yaml.Node | None = None
    documents = nodes = 0
    events: Iterator[Any] = yaml.parse(text, Loader=_PARSER)  # libyaml's marks are typed apart
    for event in events:
        node: yaml.Node
        start: Any = event.start_mark
        end: Any = event.end_mark
        line = start.line + 1 if start is not None and numbered else 0
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise SpecError([f"{Location(shown, line)}: a second YAML document; a spec file holds one"])
            continue
        if isinstance(event, yaml.AliasEvent):
            target = anchors.get(event.anchor or "")
            if target is None:
                raise SpecError([f"{Location(shown, line)}: an alias (`*`) to no complete anchor (`&`) before it"])
            node = _ALIAS_OF[type(target)](target.tag, target.value, start, end)
        elif isinstance(event, yaml.ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolver.resolve(yaml.ScalarNode, event.value, event.implicit)
            node = yaml.ScalarNode(tag, event.value, start, end, style=event.style)
            if event.anchor:
                anchors[event.anchor] = node
        elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            if depth + len(open_) >= MAX_DEPTH:
                raise SpecError([f"{Location(shown, line)}: values nest more than {MAX_DEPTH} levels deep"])
            kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolver.resolve(kind, None, event.implicit)
            open_.append((kind(tag, [], start, end, event.flow_style), [], event.anchor))
            continue
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            node, items, anchor = open_.pop()
            node.value = (
                items if isinstance(node, yaml.SequenceNode) else list(zip(items[::2], items[1::2], strict=True))
            )
            node.end_mark = end
            if anchor:
                anchors[anchor] = node
        else:
            continue  # stream and document ends
        nodes += 1
        if nodes > MAX_VALUES:
            raise SpecError([f"{Location(shown, line)}: more than {MAX_VALUES:,} values in one file"])
        if open_:
            open_[-1][1].append(node)
        else:
            root = node
    return root


@dataclass
class _Converter:
    """Turns a node tree into plain data, recording the location of every path and spending the budget."""

    shown: str
    locations: dict[Path_, Location]
    budget: _Budget
    numbered: bool = True
    """Whether locations carry line numbers (not for a value given on the command line)."""
    constructor: yaml.constructor.SafeConstructor = field(default_factory=yaml.constructor.SafeConstructor)

    def convert(self, node: yaml.Node, path: Path_, depth: int, alias: Location | None = None) -> Any:
        """`node` at `path`, `depth` levels deep; `alias` is where the outermost alias being expanded is."""
        here = Location(self.shown, self._line(node))
        if alias is None and isinstance(node, _ALIASES):
            alias = here
        self.budget.values -= 1
        if self.budget.values < 0:
            how = " (this alias repeats its anchor's values)" if alias else ""
            raise SpecError([f"{alias or here}: the graph expands to more than {MAX_VALUES:,} values{how}"])
        self.locations[path] = here
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if depth >= MAX_DEPTH:
            raise SpecError([f"{alias or here}: values nest more than {MAX_DEPTH} levels deep"])
        if isinstance(node, yaml.SequenceNode):
            if node.tag != SEQ_TAG:
                raise SpecError([f"{here}: unsupported YAML tag {short_repr(node.tag)}"])
            return [self.convert(item, (*path, i), depth + 1, alias) for i, item in enumerate(node.value)]
        if node.tag != MAP_TAG:
            raise SpecError([f"{here}: unsupported YAML tag {short_repr(node.tag)}"])
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            where = Location(self.shown, self._line(key_node))
            if key_node.tag == MERGE_TAG:
                raise SpecError([f"{where}: YAML merge keys (`<<`) are not supported; compose pieces with `use:`"])
            key = self._scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                got = short_repr(key) if key is not None or isinstance(key_node, yaml.ScalarNode) else "a collection"
                raise SpecError([f"{where}: mapping keys must be strings, got {got}"])
            if key in out:
                first = f" (first set at line {self.locations[(*path, key)].line})" if self.numbered else ""
                raise SpecError([f"{where}: duplicate key {short_repr(key)}{first}"])
            out[key] = self.convert(value_node, (*path, key), depth + 1, alias)
            self.locations[(*path, key)] = where
        return out

    def _line(self, node: yaml.Node) -> int:
        return node.start_mark.line + 1 if self.numbered and node.start_mark is not None else 0

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        where = Location(self.shown, self._line(node))
        if node.tag not in _SCALAR_TAGS:
            raise SpecError([f"{where}: unsupported YAML tag {short_repr(node.tag)}"])
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, KeyError, AttributeError, TypeError, OverflowError):
            kind = node.tag.removeprefix(_TAG)
            raise SpecError([f"{where}: not a valid YAML {kind} (an explicit !!{kind} or a malformed value)"]) from None


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters (a value in a message, never a page of it)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
