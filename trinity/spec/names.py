"""The one type of every user-given name that becomes a node id, a path or a label.

A `Name` is 1-64 characters: ASCII letters, digits, '.', '-' and '_', starting with a letter or a
digit. So a name is always exactly one path segment (no '/', never '.' or '..', no leading '-'
that a shell tool could read as an option) and needs no quoting in Mermaid, DOT, SQL strings or
a terminal. Node ids join names with '/', '@' and a '[branch]' label, characters a name never
holds, so a node id can be split back into its parts.

Used for the experiment (`runs/<name>`), data sources, pretraining phases and evals.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

NAME_MAX_LENGTH = 64
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX_LENGTH - 1}}}$"
NAME_RULE = (
    f"must be 1-{NAME_MAX_LENGTH} characters: ASCII letters, digits, '.', '-' or '_', starting with a letter or a digit"
)
"""What a name may be, as error messages say it."""

_NAME = re.compile(NAME_PATTERN)


def is_name(text: str) -> bool:
    """Whether `text` is a valid `Name` (`fullmatch`: a trailing newline is not allowed either)."""
    return _NAME.fullmatch(text) is not None


def _check_name(value: str) -> str:
    if not is_name(value):
        raise PydanticCustomError("trinity_name", NAME_RULE)
    return value


Name = Annotated[
    str,
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": NAME_PATTERN, "maxLength": NAME_MAX_LENGTH}),
]
"""A user-given name that becomes a node id, a path segment or a label (see the module docstring)."""


NODE_ID_MAX_LENGTH = 1024
SEGMENT_MAX_BYTES = 255
"""The longest file name common file systems allow."""


def node_id_problem(node_id: str) -> str | None:
    """What makes `node_id` unusable as a relative path under RUN/nodes, or None if nothing does.

    A node id is '/'-separated segments (`pretrain/phase1`, `eval/heldout@pretrain[muon.lr=0.002]`):
    none empty, '.' or '..', none longer than a file name may be, and no control character (NUL,
    newline, terminal escapes) or backslash anywhere.
    """
    if not node_id:
        return "is empty"
    if len(node_id) > NODE_ID_MAX_LENGTH:
        return f"is longer than {NODE_ID_MAX_LENGTH} characters"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in node_id):
        return "contains a control character"
    if "\\" in node_id:
        return "contains a backslash"
    if node_id.startswith("/"):
        return "is an absolute path"
    for segment in node_id.split("/"):
        if not segment:
            return "has an empty segment"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
        if len(segment.encode("utf-8", "surrogatepass")) > SEGMENT_MAX_BYTES:
            return f"has a segment longer than {SEGMENT_MAX_BYTES} bytes"
    return None
