"""What every command shares: how input errors end a command."""

from __future__ import annotations

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
