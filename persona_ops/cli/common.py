"""What every command shares: how input errors end a command."""

from __future__ import annotations

import logging
import os
from typing import NoReturn

import typer

INPUT_ERROR_MARK = "persona-ops: input error:"


def fail(e: Exception) -> NoReturn:
    """Print an input error (file, field, what was expected) and exit with status 2."""
    typer.echo(f"{INPUT_ERROR_MARK} {e}", err=True)
    raise typer.Exit(2)


def prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


class _NoInputErrorTraceback(logging.Filter):
    """Log records of an ``InputError`` keep their one-line message and lose the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from persona_ops.errors import InputError

        if record.exc_info and isinstance(record.exc_info[1], InputError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_input_errors() -> None:
    """No traceback for input errors in what Prefect logs (the command prints the error once)."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in logging.root.manager.loggerDict
                                       if name.startswith("prefect")]
    for handler in {h for lg in loggers for h in getattr(lg, "handlers", [])}:
        if not any(isinstance(f, _NoInputErrorTraceback) for f in handler.filters):
            handler.addFilter(_NoInputErrorTraceback())
