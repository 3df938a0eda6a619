"""The one error type users see from spec loading: every problem as `file:line: path message`."""

from __future__ import annotations


class SpecError(Exception):
    """A spec that cannot be used; `lines` are the problems, each naming file, line and field."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))
