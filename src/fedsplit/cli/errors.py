"""Errors a user can cause end the ``fedsplit`` command with one line, not a traceback.

:class:`FedsplitCLI` is the Typer app class: any exception of a user-error kind that
escapes a command — an unreachable server, a refusal by the server (wrong token, model
mismatch, admission), a bad config file, a missing checkpoint, a bad model spec — is
printed as ``error: <message>`` and the command exits with status 2. ``--verbose`` keeps
the traceback. Anything else is a bug and still shows its traceback.
"""

from __future__ import annotations

import logging
import sys
import typing

import typer

EXIT_USER_ERROR = 2


def fail(message: str) -> typing.NoReturn:
    """End the command with a user-caused error: one line, no traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def call(layer_function, *args, **kwargs):
    """Call into the layers; a user-caused error (a bad model spec, a missing file, a value no run
    can use, an unreachable server) becomes one line, no traceback."""
    from ..model.loading import ModelSpecError, UnsupportedModelError

    try:
        return layer_function(*args, **kwargs)
    except (ModelSpecError, UnsupportedModelError, FileNotFoundError, ValueError, ConnectionError) as exc:
        fail(str(exc))


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a user-caused error, or None if ``exc`` is not one."""
    from ..client.remote import RemoteError, ServerUnreachable
    from ..model.loading import ModelSpecError, UnsupportedModelError
    from ..model.store import CheckpointError
    from ..tasks.base import TaskError
    from .config import ConfigError

    if isinstance(exc, RemoteError):
        hint = ""
        if exc.code.name == "UNAUTHENTICATED":
            hint = " — pass the token `fedsplit token add` printed (--token or FEDSPLIT_TOKEN)"
        return f"the server refused the request ({exc.code.name}): {exc.message}{hint}"
    if isinstance(
        exc,
        (ServerUnreachable, ConfigError, CheckpointError, ModelSpecError, UnsupportedModelError, TaskError),
    ):
        return str(exc)
    return None


class FedsplitCLI(typer.Typer):
    """A Typer app that reports user errors in one line (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            message = user_error_message(exc)
            if message is None or logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            line = " ".join(message.split())  # one line, whatever the server or parser wrote
            typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
            sys.exit(EXIT_USER_ERROR)
