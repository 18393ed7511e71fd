"""What every ``diadb`` command shares: one-line errors with exit status 2, and labels.

A command registered through :func:`command` turns the ``diadb.Error`` it raises into one line
on stderr and exit status 2 (no traceback), and its URL arguments (``url``, ``reference_url``)
may be ``@label``: the URL the label index gives (:mod:`diadb.index`). Long commands show
progress (rich) only when stdout is a terminal (:func:`with_status`).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from diadb.errors import Error
from diadb.index import resolve_url

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Parameters of a command that are database URLs (``@label`` accepted).
URL_PARAMETERS = ("url", "reference_url")


def fail(message: str) -> typer.Exit:
    """Print ``message`` as one line on stderr; the ``typer.Exit`` (status 2) to raise."""
    # One line, whatever the driver's message looked like (libpq's span several).
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code=2)


def in_terminal() -> bool:
    """Whether stdout is a terminal (progress is shown only then; scripts see none)."""
    return sys.stdout.isatty()


def with_status(label: str, work: Callable[[Callable[[str], None]], T]) -> T:
    """Run ``work(say)`` under a rich spinner with the elapsed time and ``say``'s last message,
    when stdout is a terminal; otherwise ``say`` does nothing."""
    if not in_terminal():
        return work(lambda _message: None)
    from rich.console import Console

    start = time.monotonic()
    with Console(stderr=True).status(f"{label}...") as spinner:

        def say(message: str) -> None:
            spinner.update(f"{label}: {message} ({time.monotonic() - start:.0f} s)")

        return work(say)


def command(app: typer.Typer, name: str | None = None) -> Callable[[F], F]:
    """Register a function as a command of ``app`` (see the module docstring)."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                for key in URL_PARAMETERS:
                    if isinstance(kwargs.get(key), str):
                        kwargs[key] = resolve_url(kwargs[key])
                return fn(*args, **kwargs)
            except Error as e:
                raise fail(str(e)) from None

        app.command(name)(run)
        return fn

    return register


__all__ = ["URL_PARAMETERS", "command", "fail", "in_terminal", "with_status"]
