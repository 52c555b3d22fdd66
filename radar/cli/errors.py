"""How the CLI reports a mistake the user can fix: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console

err = Console(stderr=True)


class UserError(Exception):
    """A mistake the user can fix; reported as one line."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input was wrong" rather than "radar has a bug"."""
    from radar.decoding.model import ModelLoadError

    return UserError, ModelLoadError, ValueError, FileNotFoundError


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into a one-line message and exit code 2."""
    try:
        yield
    except user_error_types() as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def say(text: str) -> None:
    """A progress or status line on stderr (stdout stays for results)."""
    err.print(text, highlight=False, soft_wrap=True)
