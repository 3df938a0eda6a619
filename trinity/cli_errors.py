"""How every `trinity` command reports: the two consoles, the error handling shared by all commands (exit 2 for a
trinity error, 1 for a bug, 130 for Ctrl-C) and user text shown as written inside rich markup."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from trinity.errors import SpecError, TrinityError

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(fn: F) -> F:
    """A SpecError as located lines, any other TrinityError as one line: exit 2. Ctrl-C: exit 130.
    Anything else is a bug: its type and message, exit 1 (the traceback with --debug). Messages are
    printed as text: rich markup and emoji codes in them (`[red]x`, `:fire:`) are never interpreted, and
    control characters are shown as escapes (`\\x1b`), so a value cannot drive the terminal."""

    from rich.markup import escape

    from trinity.cli_render import printable

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SpecError as exc:
            if debug:
                raise
            for line in exc.lines:
                shown = escape(printable(line, newlines=False))  # one problem, one line
                err.print(f"[bold red]error[/]: {shown}", highlight=False, soft_wrap=True, emoji=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:  # outside the scheduler (which says what it stopped): claim no node's fate
            err.print(
                "[yellow]interrupted[/] (Ctrl-C); `trinity status RUN_DIR` shows what still runs; "
                "continue with `trinity resume RUN_DIR`",
                highlight=False,
            )
            raise typer.Exit(130) from None
        except TrinityError as exc:
            if debug:
                raise
            shown = escape(printable(str(exc)))
            err.print(f"[bold red]error[/]: {shown}", highlight=False, soft_wrap=True, emoji=False)
            raise typer.Exit(2) from None
        except Exception as exc:
            if debug:
                raise
            err.print(
                f"[bold red]error[/]: {type(exc).__name__}: {escape(printable(str(exc)))} "
                "(run with --debug for a traceback)",
                highlight=False,
                soft_wrap=True,
                emoji=False,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def shown(value: object) -> str:
    """User text (a path, a node id, a reason) inside a rich-markup message: printed as written."""
    from rich.markup import escape

    from trinity.cli_render import printable

    return escape(printable(str(value)))
