"""Cross-field rules: collected, then raised together with the dotted path of each culprit.

A validator never changes a value; it checks. Each violation names the field it is about,
relative to the model that checks it, so the loader can point at the file and line that set
it. Pydantic wraps the raised `RuleViolations` in its ValidationError (under `ctx["error"]`);
`trinity.spec.loading` unpacks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Violation:
    """One broken rule: the field path (relative to the checking model) and the message."""

    path: tuple[str | int, ...]
    message: str
    related: tuple[tuple[str | int, ...], ...] = ()
    """Other fields whose values broke the rule with `path`'s (a layout that must divide a batch): the
    loader names where each was set and blames the line the user wrote (a `--set`, the graph file) over
    a preset's line."""


class RuleViolations(ValueError):
    """Raised by a validator with every rule it found broken."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{'.'.join(map(str, v.path))}: {v.message}" for v in violations))


@dataclass
class Rules:
    """Collects violations; `raise_if_any` raises them all at once."""

    violations: list[Violation] = field(default_factory=list)

    def check(self, ok: bool, path: str | tuple[str | int, ...], message: str, related: tuple[str, ...] = ()) -> None:
        """Record `message` against `path` unless `ok`; `related`: the dotted paths of the other fields
        the rule reads (see Violation.related)."""
        if not ok:
            parts: tuple[str | int, ...] = tuple(path.split(".")) if isinstance(path, str) else path
            self.violations.append(Violation(parts, message, tuple(tuple(r.split(".")) for r in related)))

    def raise_if_any(self) -> None:
        if self.violations:
            raise RuleViolations(self.violations)
