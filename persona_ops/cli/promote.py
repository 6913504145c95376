"""``persona-ops promote``: move an alias of a registered model to a version whose run's metrics
pass a gate, list the aliases and their history, roll an alias back."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from persona_ops.cli.common import fail
from persona_ops.errors import InputError

ROOT_HELP = "Project directory (the store is $MLFLOW_TRACKING_URI, else <root>/mlflow.db)."
GATE_HELP = ("Promote only if the version's run metrics pass, e.g. "
             "\"evil.trait_mean>60 and evil.coherence_mean>=50\" (<, <=, >, >=, ==, !=; and, or, parentheses).")


def register(app: typer.Typer) -> None:
    app.command("promote")(promote)


def promote(name: str = typer.Argument(..., help="Registered model, e.g. lora-adapter-evil."),
            version: Optional[int] = typer.Option(None, "--version", "-v", help="Version to promote."),
            alias: str = typer.Option("champion", help="Alias to move."),
            gate: Optional[str] = typer.Option(None, "--if", help=GATE_HELP),
            reason: Optional[str] = typer.Option(None, help="Why (recorded; default: the gate)."),
            list_: bool = typer.Option(False, "--list", help="Show the aliases and their history."),
            rollback: Optional[str] = typer.Option(None, help="Move this alias back to its previous holder."),
            root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Move ALIAS of NAME to VERSION (refused, exit 1, naming the failing clause, when the gate
    fails); or --list; or --rollback ALIAS. Who, when and why are kept in the registry."""
    from persona_ops.tracking import promotion, store

    try:
        modes = [m for m, on in (("--version", version is not None), ("--list", list_),
                                 ("--rollback", rollback is not None)) if on]
        if len(modes) != 1:
            raise InputError(f"promote {name}: expected one of --version N, --list, --rollback ALIAS, "
                             f"found {', '.join(modes) or 'none'}")
        store.configure(root)
        if list_:
            typer.echo("\n".join(promotion.listing(name)))
            return
        if rollback is not None:
            outcome = promotion.rollback(name, rollback, reason=reason)
        else:
            outcome = promotion.promote(name, version, alias, gate=gate, reason=reason)
    except InputError as e:
        fail(e)
    typer.echo(outcome.message(), err=bool(outcome.refused))
    if outcome.refused:
        raise typer.Exit(1)
