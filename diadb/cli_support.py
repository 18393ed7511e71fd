"""What every ``diadb`` command shares: one-line errors with exit status 2, and labels.

A command registered through :func:`command` turns the ``diadb.Error`` it raises into one line
on stderr and exit status 2 (no traceback), and its URL arguments (``url``, ``reference_url``)
may be ``@label``: the URL the label index gives (:mod:`diadb.index`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from diadb.errors import Error
from diadb.index import resolve_url

F = TypeVar("F", bound=Callable[..., Any])

#: Parameters of a command that are database URLs (``@label`` accepted).
URL_PARAMETERS = ("url", "reference_url")


def fail(message: str) -> typer.Exit:
    """Print ``message`` as one line on stderr; the ``typer.Exit`` (status 2) to raise."""
    # One line, whatever the driver's message looked like (libpq's span several).
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code=2)


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


__all__ = ["URL_PARAMETERS", "command", "fail"]
